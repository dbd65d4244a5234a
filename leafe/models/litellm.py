"""The `litellm` backend: API models (OpenAI, Anthropic, any OpenAI-compatible server, ...).

Every sample is its own request (most providers ignore `n`), sent with `litellm.acompletion`
on a private event loop, at most `concurrency` in flight. Each request carries a seed derived
from the conversation's seed and the sample index (`drop_params` removes it for providers
without seeds), so resumed runs ask for the same samples.

Errors:

* transient (429, 408, 409, 5xx, timeouts, dropped connections, malformed responses): retried
  up to `max_retries` times with exponential backoff and jitter, or after the server's
  `Retry-After` (capped by `backoff_max`); each retry is logged at WARNING on
  `leafe.models.litellm`. A sample still failing comes back as an errored `Completion`
  (`error`, `finish_reason="error"`), and the agent loop fails that episode visibly;
* 401, 403, 404 (bad key, no access, unknown model or URL), and errors the provider's client
  raises before sending anything (no key at all): `UserError` at once, since every call would
  fail the same way;
* anything else (400, 422, ...): an errored `Completion` at once, not retried.

`batch_size` conversations are fanned out at once (their samples queue for the `concurrency`
slots); the next conversation starts when one is done.

litellm's own retries are off (`num_retries=0`, `max_retries=0`), so every attempt is one
request and is counted once (`Completion.retries`, `ModelUsage.retries`).

Stop strings are kept at the end of the text, as in the transformers backend. OpenAI-style APIs
remove the stop string that ended a reply and report `finish_reason="stop"` for it and for a
natural end of turn alike. The string is put back when the server says which one matched
(`stop_reason`, as vLLM and SGLang return; litellm passes it through); when the server says
nothing (OpenAI itself) and the request had exactly one stop string, a reply that finished
with "stop" gets it back (so a reply that ended its turn on its own also gets it: the API does
not tell the two apart); with several stop strings and no `stop_reason` the text is left as
returned. A text that contains a stop string (a provider that dropped `stop`) is cut after the
first one, client side.

API keys come only from the environment (`api_key_env`, else litellm's provider default) and
are never written to records, provenance or logs.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import inspect
import json
import logging
import os
import random
import threading
import time
import warnings
from typing import Any, Coroutine, TypeVar

# litellm fetches its model cost map from GitHub at import unless told to use the bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import diskcache  # noqa: E402
import litellm  # noqa: E402
import tenacity  # noqa: E402

from leafe.errors import UserError  # noqa: E402
from leafe.models.base import ChatModel, Completion, Conversation, Sampling  # noqa: E402
from leafe import paths  # noqa: E402
from leafe.seeds import derive_seed  # noqa: E402
from leafe.spec.schema import LiteLLMModelSpec  # noqa: E402

log = logging.getLogger("leafe.models.litellm")

# Quiet: our own WARNINGs report retries; litellm's banners and per-call logs would repeat them.
litellm.suppress_debug_info = True
litellm.telemetry = False
for _name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
    logging.getLogger(_name).setLevel(logging.ERROR)
# pydantic warns about litellm's own types when it first builds them (nothing a user can fix).
warnings.filterwarnings("ignore", message=r"Items? .* using the `ReadOnly` qualifier", category=UserWarning)

#: `params` keys that leafe sets itself, with where the value comes from instead.
RESERVED_PARAMS = {
    "model": "the model's `name`", "messages": "the agent loop", "api_base": "the model's `api_base`",
    "base_url": "the model's `api_base`", "api_key": "the environment variable named by `api_key_env`",
    "timeout": "the model's `timeout`", "num_retries": "the model's `max_retries`",
    "max_retries": "the model's `max_retries`", "n": "the number of samples asked for",
    "stream": "leafe (replies are not streamed)", "temperature": "the model's `temperature`",
    "top_p": "the model's `top_p`", "max_tokens": "the model's `max_tokens`",
    "stop": "the environment's `action.stop`", "seed": "the spec's `seed`",
}

TRANSIENT_STATUS = {408, 409, 429}
CONFIG_STATUS = {401: "the API key was refused", 403: "the API key has no access to this model",
                 404: "the model or the URL was not found"}

T = TypeVar("T")


#: The Router's name for the deployments of `api_bases` (never sent to a server).
ROUTER_ALIAS = "leafe-replicas"


class MalformedResponse(Exception):
    """A reply that parsed but is not a usable chat completion (e.g. no choices)."""


class _Retry(Exception):
    """A transient error, with the delay the server asked for (seconds) if it gave one."""

    def __init__(self, reason: str, retry_after: float | None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


# ---------------------------------------------------------------------------------- errors


def _status(e: BaseException) -> int | None:
    code = getattr(e, "status_code", None)
    return code if isinstance(code, int) else None


def retry_after_seconds(headers: Any) -> float | None:
    """The delay a response's headers ask for: `retry-after-ms`, or `Retry-After` as seconds
    or an HTTP date; None when absent or unreadable."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(0.0, float(ms) / 1000)
        value = headers.get("retry-after")
    except (AttributeError, TypeError, ValueError):
        return None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _headers_of(e: BaseException) -> Any:
    headers = getattr(e, "litellm_response_headers", None)
    if headers is None:
        headers = getattr(getattr(e, "response", None), "headers", None)
    return headers


def _client_side(e: BaseException) -> BaseException | None:
    """The provider SDK's own error raised before any request was sent (e.g. openai's
    "Missing credentials"), which litellm reports as a 500: a configuration problem."""
    import openai

    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, openai.OpenAIError) and not isinstance(x, openai.APIError):
            return x
        x = x.__cause__ or x.__context__
    return None


def _is_transient(e: BaseException) -> bool:
    if isinstance(e, (MalformedResponse, asyncio.TimeoutError, litellm.Timeout,
                      litellm.APIConnectionError)):
        return True
    code = _status(e)
    # litellm reports a dropped connection and an unparsable body as 500 InternalServerError.
    return code is not None and (code in TRANSIENT_STATUS or code >= 500)


def _reason(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    code = _status(e)
    name = type(e).__name__
    msg = str(e).strip()
    # litellm prefixes its messages with its class names; keep the message short and readable.
    for prefix in (f"litellm.{name}: ", f"{name}: "):
        msg = msg.removeprefix(prefix)
    return f"{code or ''} {name}: {msg}".strip()[:500]


# ---------------------------------------------------------------------------------- the loop


class _LoopThread:
    """An event loop running forever in a daemon thread: `generate` stays synchronous and
    works from any thread, even one with a running loop, and litellm's HTTP clients (cached
    per loop) keep their connections between calls."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="leafe-litellm", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("LiteLLMModel.generate called from its own event loop")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt in the caller: stop the requests too
            raise

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.run(_close_loop_clients())
        except Exception:  # best effort: the clients are litellm's
            log.debug("closing litellm's clients failed", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()


async def _close_loop_clients() -> None:
    """Close the HTTP clients litellm cached for the running loop (its client cache keys end
    with a per-loop token), so their connections do not outlive the model."""
    from litellm.caching.evicted_client_closer import running_loop_token

    token = running_loop_token()
    cache = litellm.in_memory_llm_clients_cache
    if token is None:
        return
    for key in [k for k in list(cache.cache_dict) if isinstance(k, str) and k.endswith(f"-{token}")]:
        client = cache.cache_dict.get(key)
        for method in ("aclose", "close"):
            fn = getattr(client, method, None)
            if callable(fn):
                try:
                    result = fn()
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    pass
                break
        cache.delete_cache(key)
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


# ---------------------------------------------------------------------------------- the model


class LiteLLMModel(ChatModel):
    """An API model called through litellm (see the module docstring)."""

    def __init__(self, spec: LiteLLMModelSpec, api_key: str | None = None):
        """`api_key` overrides the key read from `spec.api_key_env` (leafe's own servers)."""
        for key in spec.params:
            if key in RESERVED_PARAMS:
                raise UserError(
                    f"model {spec.name!r}: litellm `params` may not set {key!r}; "
                    f"it comes from {RESERVED_PARAMS[key]}"
                )
        self.spec = spec
        self._api_key = api_key if api_key is not None else self._read_key(spec)
        self._cache: diskcache.Cache | None = None
        if spec.cache:
            path = paths.cache_root() / "litellm"
            path.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(str(path))
        self._loop = _LoopThread()
        self._sem: asyncio.Semaphore | None = None  # made on the loop, shared by all calls
        self._router = self._make_router(spec) if spec.api_bases else None

    @classmethod
    def from_spec(cls, spec: LiteLLMModelSpec, api_key: str | None = None) -> "LiteLLMModel":
        if not isinstance(spec, LiteLLMModelSpec):
            raise TypeError(f"LiteLLMModel needs a LiteLLMModelSpec, got {type(spec).__name__}")
        return cls(spec, api_key=api_key)

    def _make_router(self, spec: LiteLLMModelSpec) -> Any:
        """litellm's Router over `api_bases`: one deployment per server under one alias. Its
        own retries are off (leafe's retry policy wraps every request, and a retry may land
        on another server)."""
        from litellm import Router

        deployments = [{"model_name": ROUTER_ALIAS,
                        "litellm_params": {"model": spec.name, "api_base": base, "api_key": self._api_key}}
                       for base in spec.api_bases or []]
        return Router(model_list=deployments, routing_strategy="simple-shuffle", num_retries=0,
                      allowed_fails=3, cooldown_time=5)

    @staticmethod
    def _read_key(spec: LiteLLMModelSpec) -> str | None:
        if spec.api_key_env is None:
            return None  # litellm reads the provider's default variable (OPENAI_API_KEY, ...)
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise UserError(
                f"model {spec.name!r}: the environment variable {spec.api_key_env} (api_key_env) "
                f"is not set or empty; export it with the API key "
                f"(keys are read from the environment only, never from specs)"
            )
        return key

    def _scrub(self, text: str) -> str:
        """`text` without the API key (error messages sometimes echo parts of the request)."""
        # Short strings are no secret worth the garbling (a dummy key "x" for a local server).
        key = self._api_key
        return text.replace(key, "***") if key and len(key) >= 8 else text

    # ------------------------------------------------------------------ requests

    def _request(self, conv: Conversation, sampling: Sampling, seed: int | None) -> dict[str, Any]:
        """The request of one sample, without the key (also what the cache key hashes)."""
        req: dict[str, Any] = {
            "model": self.spec.name,
            "messages": [{"role": m["role"], "content": m["content"]} for m in conv],
            "temperature": sampling.temperature,
            "max_tokens": sampling.max_tokens,
            **self.spec.params,
        }
        # Only when it matters: some APIs (recent Claude models) refuse temperature with top_p.
        if sampling.top_p < 1.0:
            req["top_p"] = sampling.top_p
        stop = [s for s in sampling.stop if s]
        if stop:
            req["stop"] = stop
        if seed is not None:
            req["seed"] = seed
        return req

    def _cache_key(self, req: dict[str, Any], sample: int) -> str:
        full = {"api_base": self.spec.api_base, **req}
        if self.spec.api_bases:  # replicas of one model: any of them gives the same reply
            full["api_base"] = sorted(self.spec.api_bases)
        blob = json.dumps(full, sort_keys=True, default=str, ensure_ascii=False)
        return f"{hashlib.sha256(blob.encode()).hexdigest()}/{sample}"

    def _generate(
        self, conversations: list[Conversation], sampling: Sampling, seeds: list[int] | None
    ) -> list[Completion]:
        if self._loop.loop.is_closed():
            raise RuntimeError(f"model {self.spec.name!r} is closed")
        n = sampling.n
        jobs: list[tuple[int, int, dict[str, Any], str | None]] = []
        out: list[Completion | None] = [None] * (len(conversations) * n)
        for i, conv in enumerate(conversations):
            base = seeds[i] if seeds is not None else sampling.seed
            for s in range(n):
                req = self._request(conv, sampling, sample_seed(base, i, s, seeds is not None))
                key = self._cache_key(req, s) if self._cache is not None else None
                hit = self._cache.get(key) if key is not None else None
                if hit is not None:
                    out[i * n + s] = Completion(index=i, sample=s, cached=True, **hit)
                else:
                    jobs.append((i, s, req, key))
        if jobs:
            for (i, s, _, _), c in zip(jobs, self._loop.run(self._run_jobs(jobs, sampling))):
                out[i * n + s] = c
        return [c for c in out if c is not None]

    async def _run_jobs(self, jobs: list[tuple[int, int, dict[str, Any], str | None]],
                        sampling: Sampling) -> list[Completion]:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.spec.concurrency)
        # batch_size: conversations fanned out at once (their samples queue on `concurrency`).
        window = asyncio.Semaphore(self.spec.batch_size)
        by_conv: dict[int, list[tuple[int, dict[str, Any], str | None]]] = {}
        for i, s, req, key in jobs:
            by_conv.setdefault(i, []).append((s, req, key))

        async def conversation(i: int) -> list[Completion]:
            async with window:
                return list(await asyncio.gather(
                    *(self._sample(i, s, req, key, sampling) for s, req, key in by_conv[i])))

        tasks = [asyncio.ensure_future(conversation(i)) for i in by_conv]
        try:
            done = await asyncio.gather(*tasks)
        except BaseException:
            # A configuration error (or cancellation): stop the other requests now.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        by_key = {(c.index, c.sample): c for cs in done for c in cs}
        return [by_key[(i, s)] for i, s, _, _ in jobs]

    async def _sample(self, index: int, sample: int, req: dict[str, Any], key: str | None,
                      sampling: Sampling) -> Completion:
        spec = self.spec
        retries = 0

        def wait(state: tenacity.RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, _Retry) and exc.retry_after is not None:
                return min(exc.retry_after, spec.backoff_max)
            # Exponential, with jitter in [d/2, d] so that parallel samples spread out.
            d = min(spec.backoff * 2 ** (state.attempt_number - 1), spec.backoff_max)
            return random.uniform(d / 2, d)

        def before_sleep(state: tenacity.RetryCallState) -> None:
            nonlocal retries
            retries += 1
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning(
                "%s: %s (conversation %d, sample %d, attempt %d of %d); retrying in %.2f s",
                spec.name, self._scrub(getattr(exc, "reason", str(exc))), index, sample,
                state.attempt_number, spec.max_retries + 1, delay,
            )

        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_attempt(spec.max_retries + 1),
            retry=tenacity.retry_if_exception_type(_Retry),
            wait=wait,
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            completion = await retrying(self._attempt, index, sample, req, sampling)
        except _Retry as e:
            return self._failed(index, sample, f"{e.reason} (gave up after {retries} retries)", retries)
        except UserError:
            raise
        except Exception as e:  # not retried: a bad request (400, 422, ...)
            return self._failed(index, sample, self._scrub(_reason(e)), retries)
        completion.retries = retries
        if key is not None and self._cache is not None:
            self._cache.set(key, {
                "text": completion.text, "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "finish_reason": completion.finish_reason,
            })
        return completion

    @staticmethod
    def _failed(index: int, sample: int, error: str, retries: int) -> Completion:
        return Completion("", index, sample, 0, 0, "error", error=error, retries=retries)

    async def _attempt(self, index: int, sample: int, req: dict[str, Any],
                       sampling: Sampling) -> Completion:
        """One request: a Completion, `_Retry` for a transient error, `UserError` for a
        configuration error, or the exception of an error not worth retrying."""
        spec = self.spec
        assert self._sem is not None
        async with self._sem:
            try:
                if self._router is not None:
                    call = self._router.acompletion(**{**req, "model": ROUTER_ALIAS}, timeout=spec.timeout,
                                                    num_retries=0, max_retries=0, drop_params=True)
                else:
                    call = litellm.acompletion(**req, api_base=spec.api_base, api_key=self._api_key,
                                               timeout=spec.timeout, num_retries=0, max_retries=0,
                                               drop_params=True)
                response = await asyncio.wait_for(
                    call,
                    # litellm's timeout covers each read; this one the whole request.
                    timeout=spec.timeout,
                )
                return self._completion(response, index, sample, sampling)
            except Exception as e:
                code = _status(e)
                if code in CONFIG_STATUS:
                    raise UserError(self._config_error(code, e)) from None
                client = _client_side(e)
                if client is not None:
                    raise UserError(self._config_error(None, client)) from None
                if _is_transient(e):
                    raise _Retry(self._scrub(_reason(e)), retry_after_seconds(_headers_of(e))) from e
                raise

    def _config_error(self, code: int | None, e: BaseException) -> str:
        """What failed and what to fix, for an error that every request would hit. `code`:
        the HTTP status, or None for an error the client raised before sending anything."""
        spec = self.spec
        where = f" at {spec.api_base}" if spec.api_base else ""
        what = CONFIG_STATUS[code] if code is not None else "the request could not be made"
        if code == 404:
            fix = "check the model's `name` (a litellm model string, e.g. openai/gpt-4o-mini) and `api_base`"
        elif spec.api_key_env:
            fix = f"check the key in the environment variable {spec.api_key_env} (api_key_env)"
        else:
            fix = ("set the provider's key variable (e.g. OPENAI_API_KEY) or name your own with "
                   "`api_key_env`")
        reason = _reason(e) if code is not None else str(e).strip()
        return f"model {spec.name!r}{where}: {what} ({self._scrub(reason)}); {fix}"

    def _completion(self, response: Any, index: int, sample: int, sampling: Sampling) -> Completion:
        choices = getattr(response, "choices", None)
        if not choices:
            raise MalformedResponse("the response has no choices")
        choice = choices[0]
        message = getattr(choice, "message", None)
        if message is None:
            raise MalformedResponse("the response's choice has no message")
        content = message.content
        text = content if isinstance(content, str) else ""
        finish = "length" if choice.finish_reason == "length" else "stop"
        extra = getattr(choice, "provider_specific_fields", None) or {}
        text, finish = restore_stop(text, finish, [s for s in sampling.stop if s],
                                    "stop_reason" in extra, extra.get("stop_reason"))
        usage = getattr(response, "usage", None)
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        return Completion(text, index, sample, prompt, completion, finish)

    # ------------------------------------------------------------------ misc

    def provenance(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "backend": "litellm",
            "name": spec.name,
            "api_base": spec.api_base,
            **({"api_bases": list(spec.api_bases)} if spec.api_bases else {}),
            "api_key_env": spec.api_key_env,  # the variable's name, never its value
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "max_tokens": spec.max_tokens,
            "params": dict(spec.params),
            "cache": spec.cache,
            "litellm_version": _litellm_version(),
        }

    def close(self) -> None:
        self._loop.close()
        if self._cache is not None:
            self._cache.close()
            self._cache = None


def sample_seed(base: int | None, index: int, sample: int, per_conversation: bool) -> int | None:
    """The seed sent with sample `sample` of conversation `index`: from the conversation's own
    seed (`per_conversation`, `generate(seeds=...)`) or from the call's `Sampling.seed`."""
    if base is None:
        return None
    if per_conversation:  # the sample depends on its conversation's seed only, not its batch
        return derive_seed(base, "litellm-sample", sample)
    return derive_seed(base, "litellm-conversation", index, "sample", sample)


def restore_stop(text: str, finish: str, stop: list[str], reported: bool,
                 stop_reason: Any) -> tuple[str, str]:
    """The reply text with its stop string kept, as the transformers backend returns it (see
    the module docstring). `reported`: the server sent a `stop_reason` (the matched stop string,
    or None / a token id for an end of turn)."""
    hits = [(p + len(s), s) for s in stop if (p := text.find(s)) >= 0]
    if hits:  # the provider did not cut (dropped or ignored `stop`): cut after the first one
        return text[: min(hits)[0]], "stop"
    if finish != "stop" or not stop:
        return text, finish
    if reported:
        return (text + stop_reason, finish) if stop_reason in stop else (text, finish)
    return (text + stop[0], finish) if len(stop) == 1 else (text, finish)


def _litellm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("litellm")
    except PackageNotFoundError:
        return None
