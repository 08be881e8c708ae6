"""Teacher collection throughput: concurrency 16 vs 1 against the local fake OpenAI server.

The server answers after a fixed latency (default 100 ms), like a remote API would, so the
ratio shows how well the collector overlaps requests. It runs in its own process, as a
remote API would not share our interpreter lock; both collections run side by side in this
process. Then the concurrency-16 run is repeated on its own output dir: the journal must
answer everything (0 new requests).

  python bench/bench_teacher.py [--questions 96] [--latency 0.1]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import args as args_mod  # noqa: E402

import flags  # noqa: E402
import teacher  # noqa: E402
import wordmath  # noqa: E402


class ServerProcess:
    """tests/fake_openai_server.py in a subprocess; counters read over GET /stats."""

    def __init__(self, latency: float):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai_server.py"),
                                      "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url.removesuffix("/v1") + "/stats") as response:
            return json.load(response)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def run(url: str, data_dir: Path, out: Path, concurrency: int) -> tuple[float, dict]:
    argv = ["--task", "wordmath", "--data_dir", str(data_dir), "--output_dir", str(out), "--backend", "openai",
            "--base_url", url, "--concurrency", str(concurrency), "--num_samples", "2"]
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        summary = teacher.run_collection(flags.parse(args_mod.TeacherArguments, argv))
    return time.perf_counter() - started, summary


def main() -> None:
    parser = argparse.ArgumentParser(description="teacher collection throughput")
    parser.add_argument("--questions", type=int, default=96)
    parser.add_argument("--latency", type=float, default=0.1)
    opts = parser.parse_args()
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-placeholder-key")

    server = ServerProcess(opts.latency)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = Path(tmp) / "data"
            (data_dir / "wordmath").mkdir(parents=True)
            rows = wordmath.generate(opts.questions, seed=0)
            (data_dir / "wordmath" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

            seconds_at = {}
            for concurrency in (1, 16):
                seconds, summary = run(server.url, data_dir, Path(tmp) / f"c{concurrency}", concurrency)
                assert summary["requests"]["new"] == opts.questions, summary["requests"]
                seconds_at[concurrency] = seconds
                print(f"concurrency {concurrency:2d}: {opts.questions} requests in {seconds:6.2f} s = "
                      f"{opts.questions / seconds:6.1f} req/s")
            print(f"speed-up 16 vs 1: {seconds_at[1] / seconds_at[16]:.1f}x (target >= 10x); "
                  f"server saw at most {server.stats()['max_in_flight']} requests in flight")

            before = server.stats()["attempts"]
            seconds, summary = run(server.url, data_dir, Path(tmp) / "c16", 16)
            print(f"re-run on the same output dir: {server.stats()['attempts'] - before} requests sent, "
                  f"{summary['requests']['from_journal']} answered from the journal, {seconds:.2f} s")
    finally:
        server.close()


if __name__ == "__main__":
    main()
