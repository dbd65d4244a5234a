"""A minimal OpenAI-compatible server over any `ChatModel`, on 127.0.0.1, for tests and
benchmarks of API backends (litellm) without a network or an API key.

>>> with LoopbackServer(model) as server:                          # doctest: +SKIP
...     server.inject(Fault.rate_limit(retry_after=1), Fault.server_error())
...     spec = model_spec(backend="litellm", name="openai/loopback", api_base=server.api_base)

Endpoints: `POST /v1/chat/completions` (non-streaming) and `GET /v1/models`. A request's
`messages`, `temperature`, `top_p`, `max_tokens` (or `max_completion_tokens`), `stop`, `n` and
`seed` become one `model.generate` call. Like OpenAI and vLLM, a stop string that ended a
reply is removed from its text; like vLLM, the choice's `stop_reason` names it (switch that
off with `stop_reason=False` to behave like OpenAI, which does not say).

Faults, for testing clients: `inject` queues faults consumed one per chat request, in order;
`plan`, a callable `(request_number, body) -> Fault | None`, decides when the queue is empty.
The server counts the chat requests it received (`requests`), per outcome (`counts`: a fault
kind or "ok"), and the most it had in flight at once (`max_in_flight`); `reset_counts` starts
over, `wait_idle` waits until no request is being answered. A request whose client hung up
(e.g. timed out) while it waited is dropped before it reaches the model.

The model runs under a lock (one `generate` at a time); requests are accepted concurrently.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from leafe.models.base import ChatModel, Sampling

FAULT_STATUS = {
    "rate_limit": 429,
    "server_error": 500,
    "bad_request": 400,
    "unauthorized": 401,
    "forbidden": 403,
    "not_found": 404,
}
FAULT_KINDS = (*FAULT_STATUS, "slow", "malformed", "drop")


@dataclass(frozen=True)
class Fault:
    """What the server does instead of (or before) answering one chat request.

    `kind`: an HTTP error (`rate_limit` 429, `server_error` 500, `bad_request` 400,
    `unauthorized` 401, `forbidden` 403, `not_found` 404, each with an OpenAI-style error body),
    `slow` (wait `delay` seconds, then answer normally), `malformed` (status 200 with a body
    that is not JSON), `drop` (close the connection without any response)."""

    kind: str
    retry_after: float | None = None
    """`Retry-After` header in seconds (any error kind; the constructor sets it for 429)."""
    delay: float = 0.0
    """Seconds to wait first (`slow`)."""

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; kinds: {', '.join(FAULT_KINDS)}")

    @classmethod
    def rate_limit(cls, retry_after: float | None = 1.0) -> "Fault":
        return cls("rate_limit", retry_after=retry_after)

    @classmethod
    def server_error(cls) -> "Fault":
        return cls("server_error")

    @classmethod
    def slow(cls, delay: float) -> "Fault":
        return cls("slow", delay=delay)

    @classmethod
    def malformed(cls) -> "Fault":
        return cls("malformed")

    @classmethod
    def drop(cls) -> "Fault":
        return cls("drop")

    @classmethod
    def bad_request(cls) -> "Fault":
        return cls("bad_request")

    @classmethod
    def unauthorized(cls) -> "Fault":
        return cls("unauthorized")


Plan = Callable[[int, dict[str, Any]], "Fault | None"]


class LoopbackServer:
    """Serves `model` as `served_name` on http://127.0.0.1:<free port>/v1 from a background
    thread; a context manager (`start`/`stop` also work).

    `api_key`: when set, requests must carry `Authorization: Bearer <api_key>` (else 401).
    `latency`: seconds every chat request waits before it is answered (to make requests
    overlap in concurrency tests)."""

    def __init__(
        self,
        model: ChatModel,
        served_name: str = "loopback",
        *,
        api_key: str | None = None,
        latency: float = 0.0,
        stop_reason: bool = True,
        plan: Plan | None = None,
    ):
        self.model = model
        self.served_name = served_name
        self.api_key = api_key
        self.latency = latency
        self.stop_reason = stop_reason
        self.plan = plan
        self._faults: deque[Fault] = deque()
        self._state = threading.Condition()  # counters and the fault queue
        self._model_lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.reset_counts()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "LoopbackServer":
        if self._httpd is not None:
            return self
        handler = type("Handler", (_Handler,), {"server_ref": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free port
        httpd.daemon_threads = True
        httpd.block_on_close = False  # a `slow` request must not hold up `stop`
        self._stopping.clear()
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="leafe-loopback", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._stopping.set()  # wakes requests sleeping in `slow` / `latency`
        self._httpd.shutdown()
        self.wait_idle()  # a model call must not outlive the server
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join(timeout=10)
        self._httpd = self._thread = None

    def __enter__(self) -> "LoopbackServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the loopback server is not running")
        return self._httpd.server_address[1]

    @property
    def api_base(self) -> str:
        """`http://127.0.0.1:<port>/v1`, for a client's base URL."""
        return f"http://127.0.0.1:{self.port}/v1"

    # ------------------------------------------------------------------ faults and counters

    def inject(self, *faults: Fault) -> None:
        """Queue faults; each chat request consumes the next one (then `plan`, then none)."""
        with self._state:
            self._faults.extend(faults)

    def reset_counts(self) -> None:
        with self._state:
            self.requests = 0
            self.counts: Counter[str] = Counter()
            self.in_flight = getattr(self, "in_flight", 0)  # live: requests still being answered
            self.max_in_flight = self.in_flight
            self.bodies: list[dict[str, Any]] = []  # chat request bodies, in arrival order
            self.headers: list[dict[str, str]] = []  # and their HTTP headers (lower-case names)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no request is being answered; False on timeout."""
        with self._state:
            return self._state.wait_for(lambda: self.in_flight == 0, timeout=timeout)

    def pending_faults(self) -> int:
        with self._state:
            return len(self._faults)

    def clear_faults(self) -> None:
        with self._state:
            self._faults.clear()

    def _arrive(self, body: dict[str, Any], headers: dict[str, str]) -> Fault | None:
        with self._state:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.bodies.append(body)
            self.headers.append(headers)
            number = self.requests
            fault = self._faults.popleft() if self._faults else None
        if fault is None and self.plan is not None:
            fault = self.plan(number, body)
        with self._state:
            self.counts[fault.kind if fault else "ok"] += 1
        return fault

    def _leave(self) -> None:
        with self._state:
            self.in_flight -= 1
            self._state.notify_all()

    # ------------------------------------------------------------------ the model

    def complete(self, body: dict[str, Any], gone: Callable[[], bool] = lambda: False) -> dict[str, Any] | None:
        """The OpenAI chat completion answering `body` (raises ValueError for a bad request);
        None when `gone()` says the client left while the request waited for the model."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("`messages` must be a non-empty list")
        conv = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise ValueError("each message needs a string `content` (content parts are not supported)")
            conv.append({"role": str(m.get("role", "user")), "content": m["content"]})
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else [str(s) for s in stop]
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 64
        seed = body.get("seed")
        try:
            sampling = Sampling(
                temperature=float(body.get("temperature", 1.0)),
                top_p=float(body.get("top_p", 1.0)),
                max_tokens=int(max_tokens),
                stop=stop,
                n=int(body.get("n") or 1),
                seed=None if seed is None else int(seed),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad sampling parameters: {e}") from None
        with self._model_lock:
            if gone() or self._stopping.is_set():  # a client that timed out: skip its work
                return None
            # generate's own argument checks (n >= 1, ...) raise ValueError: a 400 as well.
            out = self.model.generate([conv], sampling, seeds=None if seed is None else [sampling.seed])
        choices = []
        for c in out:
            text, matched = c.text, None
            if c.finish_reason == "stop":
                matched = next((s for s in stop if s and text.endswith(s)), None)
                if matched is not None:  # OpenAI and vLLM leave the stop string out
                    text = text[: -len(matched)]
            choice: dict[str, Any] = {
                "index": c.sample,
                "message": {"role": "assistant", "content": text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
            }
            if self.stop_reason:
                choice["stop_reason"] = matched
            choices.append(choice)
        prompt = out[0].prompt_tokens if out else 0
        completion = sum(c.completion_tokens for c in out)
        return {
            "id": f"chatcmpl-loopback-{uuid.uuid4().hex[:16]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_name,
            "choices": choices,
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }


def _error_body(status: int, message: str) -> dict[str, Any]:
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 429: "rate_limit_error", 500: "server_error"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"),
                      "param": None, "code": None}}


class _Handler(BaseHTTPRequestHandler):
    server_ref: LoopbackServer
    protocol_version = "HTTP/1.1"  # keep-alive, as API clients expect
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stalls

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read counters
        pass

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None,
              raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True

    def _authorized(self) -> bool:
        key = self.server_ref.api_key
        return key is None or self.headers.get("Authorization") == f"Bearer {key}"

    def do_GET(self) -> None:
        srv = self.server_ref
        if self.path.rstrip("/") != "/v1/models":
            self._send(404, _error_body(404, f"no route {self.path}"))
        elif not self._authorized():
            self._send(401, _error_body(401, "invalid API key"))
        else:
            self._send(200, {"object": "list", "data": [
                {"id": srv.served_name, "object": "model", "created": 0, "owned_by": "leafe"}]})

    def do_POST(self) -> None:
        srv = self.server_ref
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, _error_body(404, f"no route {self.path}"))
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            body = None
        fault = srv._arrive(body if isinstance(body, dict) else {}, {k.lower(): v for k, v in self.headers.items()})
        try:
            self._answer(srv, body, fault)
        finally:
            srv._leave()

    def _answer(self, srv: LoopbackServer, body: Any, fault: Fault | None) -> None:
        if srv.latency and not self._wait(srv.latency):
            self.close_connection = True
            return
        if srv._stopping.is_set():
            self.close_connection = True
            return
        if fault is not None:
            if fault.kind == "drop":
                self.close_connection = True  # the handler returns; the socket closes unanswered
                return
            if fault.kind == "malformed":
                self._send(200, None, raw=b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
                return
            if fault.kind == "slow":
                if not self._wait(fault.delay):
                    self.close_connection = True
                    return
            else:
                status = FAULT_STATUS[fault.kind]
                headers = {}
                if fault.retry_after is not None:
                    headers["Retry-After"] = f"{fault.retry_after:g}"
                self._send(status, _error_body(status, f"injected fault: {fault.kind}"), headers)
                return
        if not self._authorized():
            self._send(401, _error_body(401, "invalid API key"))
            return
        if not isinstance(body, dict):
            self._send(400, _error_body(400, "the request body is not a JSON object"))
            return
        if body.get("stream"):
            self._send(400, _error_body(400, "streaming is not supported by the loopback server"))
            return
        try:
            payload = srv.complete(body, self._client_gone)
        except ValueError as e:
            self._send(400, _error_body(400, str(e)))
            return
        except Exception as e:  # a model failure is the server's, like any 500
            self._send(500, _error_body(500, f"{type(e).__name__}: {e}"))
            return
        if payload is None:
            self.close_connection = True
            return
        self._send(200, payload)

    def _wait(self, seconds: float) -> bool:
        """Sleep; False as soon as the server stops or the client hangs up (a client that
        timed out leaves no request in flight behind it)."""
        srv = self.server_ref
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if srv._stopping.wait(min(left, 0.05)) or self._client_gone():
                return False
        return True

    def _client_gone(self) -> bool:
        """The client closed the connection (a request it no longer waits for)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True
