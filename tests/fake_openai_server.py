"""A small OpenAI-compatible chat-completions server for tests and the teacher benchmark.

It answers every request with correct rationales (the gold answer is read from the prompt's
"Correct answer:" line), honours `n`, reports token usage, and records each request's
Authorization header. Faults are injected per request from a queue (`inject`) or for every
request whose prompt contains a text (`always`):

  "429"        rate limited, with a retry-after header (`retry_after` seconds)
  "500"        internal server error
  "slow"       sleeps `slow_s` before answering (trips the client's timeout)
  "malformed"  200 with a body that is not JSON
  "empty"      200 with empty message contents
  "blank"      200 whose message contents are only whitespace
  "nochoices"  200 with an empty list of choices
  "drop"       closes the connection without answering (the client sees a connection error)
  "wrong"      200 with a wrong final answer
  "401"        authentication error
  "400"        bad request (this request only)

Run standalone: `python tests/fake_openai_server.py --latency 0.1` prints its base URL;
GET <host>/stats returns its counters.
"""
from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OPENERS = ["We read the question carefully.", "Let us go step by step.", "First we collect the facts.",
           "We reason it through.", "Consider the question.", "Look at what is given.",
           "One step at a time.", "Start with the facts.", "We check each part.", "Here is the reasoning."]


def _wrong(answer: str) -> str:
    try:
        return str(int(float(answer)) + 1)
    except ValueError:
        return {"yes": "no", "no": "yes"}.get(answer.lower(), answer + " not")


class FakeOpenAIServer:
    def __init__(self, latency: float = 0.0, retry_after: float = 0.05, slow_s: float = 2.0):
        self.latency, self.retry_after, self.slow_s = latency, retry_after, slow_s
        self.faults: deque[str] = deque()
        self.always: dict[str, str] = {}    # prompt substring -> fault for every such request
        self.auth_headers: list[str] = []
        self.attempts = 0                   # every HTTP request, faulty or not
        self.completed = 0                  # requests answered with a good 200
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # ---- control
    def inject(self, *faults: str) -> None:
        with self._lock:
            self.faults.extend(faults)

    def reset_counts(self) -> None:
        with self._lock:
            self.attempts = self.completed = self.max_in_flight = 0
            self.auth_headers.clear()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Let requests of a killed client finish server-side, so they do not count in the next run."""
        deadline = time.time() + timeout
        while self._in_flight and time.time() < deadline:
            time.sleep(0.005)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- request handling
    def _next_fault(self, prompt: str) -> str | None:
        with self._lock:
            self.attempts += 1
            for text, fault in self.always.items():
                if text in prompt:
                    return fault
            return self.faults.popleft() if self.faults else None

    def answer(self, body: dict, fault: str | None) -> dict:
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        match = re.search(r"^Correct answer: (.+)$", prompt, re.MULTILINE)
        answer = match.group(1).strip() if match else "unknown"
        if fault == "wrong":
            answer = _wrong(answer)
        n = int(body.get("n") or 1)
        # a feedback request asks for a critique, then "Correct solution:", then the solution
        critique = "The attempt went wrong at its first step. Correct solution: " if "Student's attempt:" in prompt else ""
        texts = ["" if fault == "empty" else " \n " if fault == "blank" else
                 f"{critique}{OPENERS[i % len(OPENERS)]} Variant {i}: the facts in the question lead to the result. "
                 f"Therefore, the answer is {answer}." for i in range(n)]
        choices = [] if fault == "nochoices" else [
            {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop", "logprobs": None}
            for i, t in enumerate(texts)]
        return {"id": f"chatcmpl-fake{self.attempts}", "object": "chat.completion", "created": int(time.time()),
                "model": body.get("model", "fake"), "choices": choices,
                "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": sum(len(t) // 4 for t in texts),
                          "total_tokens": len(prompt) // 4 + sum(len(t) // 4 for t in texts)}}


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # the default 5 drops SYNs of a burst of new connections: 1 s client stalls
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenAIServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # else headers and body in two writes cost a 40 ms delayed ACK

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to do

    def _error(self, status: int, message: str, headers: dict | None = None) -> None:
        body = {"error": {"message": message, "type": "fake", "code": status}}
        self._send(status, json.dumps(body).encode(), headers)

    def do_GET(self):
        """GET /stats: the counters, for a client that runs the server as a subprocess (the benchmark)."""
        server = self.owner
        if self.path.rstrip("/") != "/stats":
            return self._error(404, f"no route {self.path}")
        with server._lock:
            stats = {"attempts": server.attempts, "completed": server.completed, "max_in_flight": server.max_in_flight}
        self._send(200, json.dumps(stats).encode())

    def do_POST(self):
        server = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._error(404, f"no route {self.path}")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            return self._error(400, "body is not JSON")
        with server._lock:
            server.auth_headers.append(self.headers.get("Authorization", ""))
            server._in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server._in_flight)
        try:
            self._respond(server, body)
        finally:
            with server._lock:
                server._in_flight -= 1

    def _respond(self, server: FakeOpenAIServer, body: dict) -> None:
        prompt = "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
        fault = server._next_fault(prompt)
        if server.latency:
            time.sleep(server.latency)
        if fault == "429":
            return self._error(429, "rate limited", {"retry-after": str(server.retry_after)})
        if fault == "500":
            return self._error(500, "internal error")
        if fault in ("400", "401"):
            return self._error(int(fault), "invalid api key" if fault == "401" else "bad request")
        if fault == "slow":
            time.sleep(server.slow_s)
        if fault == "malformed":
            return self._send(200, b'{"id": "chatcmpl-broken", "choices": [')
        if fault == "drop":
            self.close_connection = True
            return  # nothing written: the client's read ends without a response
        reply = server.answer(body, fault)
        with server._lock:
            server.completed += 1
        self._send(200, json.dumps(reply).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args()
    server = FakeOpenAIServer(latency=args.latency).start()
    print(server.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
