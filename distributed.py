"""Processes and devices: `--device 0,1,...` re-launches the script under torchrun, one process per id.

We use torch's own launcher rather than a hand-written spawn, so `torchrun`, `deepspeed` and
`accelerate launch` all end up in the same code path (they set RANK / WORLD_SIZE / LOCAL_RANK).
Without a GPU the ids still give that many CPU processes over gloo.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # DeepSpeed would otherwise warn on every import that it fell back to CPU
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch_if_needed(devices: list[str]) -> None:
    """With several device ids and no launcher around us, run this same command under torchrun and exit."""
    if len(devices) <= 1 or "WORLD_SIZE" in os.environ:
        if len(devices) == 1 and torch.cuda.is_available():
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", devices[0])
        return
    env = dict(os.environ)
    if torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(len(devices)),
               "--master_port", str(free_port()), sys.argv[0], *sys.argv[1:]]
    print("launching:", " ".join(command[1:]), flush=True)
    sys.exit(subprocess.call(command, env=env))


def start(devices: list[str]) -> None:
    """A script's first step: re-launch per device if needed, then join the process group."""
    relaunch_if_needed(devices)
    init_process_group()


def ensure_single_process_env() -> None:
    """DeepSpeed looks for MPI when no launcher set these; one process needs them spelled out."""
    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_process_group() -> None:
    """Join the process group when launched with several processes (no-op for one)."""
    if world_size() > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(device())
        torch.distributed.init_process_group(backend=backend)


def gather_to_main(obj):
    """Every rank's object, as a list on rank 0 (None elsewhere)."""
    if world_size() == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered = [None] * world_size() if is_main() else None
    torch.distributed.gather_object(obj, gathered, dst=0)
    return gathered


def barrier() -> None:
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def script_main(arguments_class, run, relaunch: bool = False):
    """Entry point of a model-running script: parse its flags, start its processes (`relaunch`: under
    torchrun when --device names several ids), run; bad input ends in one `error:` line, exit 2."""
    from args import device_list, parse
    from common import cli_main

    @cli_main
    def main() -> None:
        args = parse(arguments_class)
        devices = device_list(args.device)
        relaunch_if_needed(devices) if relaunch else start(devices)
        run(args)

    return main
