"""The litellm backend through real litellm against the loopback OpenAI-compatible server,
which serves the tiny random Qwen2 and injects faults (no mocks)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

# Our module first: it points litellm at its bundled cost map before importing it (offline).
pytest.importorskip("leafe.models.litellm", reason="needs the litellm extra (litellm, diskcache, tenacity)")

from leafe import models  # noqa: E402
from leafe.errors import UserError  # noqa: E402
from leafe.models import Sampling  # noqa: E402
from leafe.models.loopback import Fault, LoopbackServer  # noqa: E402
from leafe.spec.schema import LiteLLMModelSpec, TransformersModelSpec, model_spec  # noqa: E402

# pydantic's notes on litellm's own types, raised when litellm first builds them.
pytestmark = pytest.mark.filterwarnings("ignore:Items? .* using the `ReadOnly` qualifier:UserWarning")

KEY_ENV = "LEAFE_TEST_LOOPBACK_KEY"
KEY = "sk-leafe-test-0123456789"
LOGGER = "leafe.models.litellm"

A = [{"role": "user", "content": "Push the box: <action>left</action>?"}]
B = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "#_OX#"}]
FAIL = [{"role": "user", "content": "this one fails"}]
QUICK = Sampling(temperature=1.0, max_tokens=4)


@pytest.fixture(scope="module")
def tiny(leafe_cache):
    model = models.load(TransformersModelSpec(name="leafe:tiny-qwen2"))
    yield model
    model.close()


@pytest.fixture(scope="module")
def server(tiny):
    with LoopbackServer(tiny, api_key=KEY) as srv:
        yield srv


def spec(server, **fields) -> LiteLLMModelSpec:
    return LiteLLMModelSpec(**{"name": "openai/loopback", "api_base": server.api_base,
                               "api_key_env": KEY_ENV, "backoff": 0.05, "backoff_max": 1.0,
                               "timeout": 30.0, **fields})


@pytest.fixture(scope="module", autouse=True)
def warm(server):
    """litellm's first request pays about a second of lazy setup: pay it once, here."""
    from leafe.models.litellm import LiteLLMModel

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, KEY)
        m = LiteLLMModel.from_spec(spec(server, timeout=120))
        assert m.generate([A], QUICK)[0].error is None
        m.close()


@pytest.fixture(autouse=True)
def fresh(server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    server.clear_faults()
    server.plan = None
    server.latency = 0.0
    server.stop_reason = True
    assert server.wait_idle(30)
    server.reset_counts()
    yield
    server.clear_faults()
    server.plan = None


@pytest.fixture
def make(server):
    """LiteLLMModel factory against the loopback server; closes what it made."""
    from leafe.models.litellm import LiteLLMModel

    made = []

    def _make(**fields):
        m = LiteLLMModel.from_spec(spec(server, **fields))
        made.append(m)
        return m

    yield _make
    for m in made:
        m.close()


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------- generation


def test_greedy_matches_the_model_with_token_usage(make, server, tiny):
    m = make()
    s = Sampling(temperature=0, max_tokens=6)
    out = m.generate([A, B], s)
    want = tiny.generate([A, B], s)
    assert [(c.index, c.sample) for c in out] == [(0, 0), (1, 0)]
    for c, w in zip(out, want):
        assert (c.text, c.finish_reason) == (w.text, w.finish_reason)
        assert (c.prompt_tokens, c.completion_tokens) == (w.prompt_tokens, w.completion_tokens)
        assert c.prompt_tokens > 0 and c.completion_tokens > 0
        assert (c.error, c.retries, c.cached) == (None, 0, False)
    assert server.requests == 2 and server.counts == {"ok": 2}
    u = m.usage
    assert (u.calls, u.samples, u.retries, u.errors, u.cached) == (1, 2, 0, 0, 0)
    assert u.prompt_tokens == sum(w.prompt_tokens for w in want)
    assert u.completion_tokens == sum(w.completion_tokens for w in want)
    # The key went from the environment to the server, and nowhere else.
    assert {h.get("authorization") for h in server.headers} == {f"Bearer {KEY}"}
    assert KEY not in repr(m.provenance())
    assert all("seed" not in b for b in server.bodies)  # no seeds given: none sent


def test_samples_are_distinct_and_seeded(make, server):
    m = make()
    s = Sampling(temperature=1.0, max_tokens=8, n=4)
    a = m.generate([A, B], s, seeds=[7, 8])
    assert [(c.index, c.sample) for c in a] == [(i, k) for i in range(2) for k in range(4)]
    assert server.requests == 8  # one request per sample
    assert len({b["seed"] for b in server.bodies}) == 8 and all(b.get("n", 1) == 1 for b in server.bodies)
    assert len({c.text for c in a[:4]}) == 4 and len({c.text for c in a[4:]}) == 4
    b = m.generate([A, B], s, seeds=[7, 8])
    assert [c.text for c in a] == [c.text for c in b]
    # A conversation's samples depend on its own seed only, not on its batch neighbours.
    alone = m.generate([B], s, seeds=[8])
    assert [c.text for c in alone] == [c.text for c in a[4:]]
    other = m.generate([A, B], s, seeds=[9, 10])
    assert [c.text for c in other] != [c.text for c in a]
    # Without per-conversation seeds, `sampling.seed` seeds the call.
    s1 = Sampling(temperature=1.0, max_tokens=8, n=2, seed=3)
    assert [c.text for c in m.generate([A, A], s1)] == [c.text for c in m.generate([A, A], s1)]


def test_stop_string_is_kept_like_the_transformers_backend(make, server, tiny):
    from leafe.models.litellm import sample_seed

    m = make()
    s = Sampling(temperature=1.0, max_tokens=24, n=6, stop=["e"])
    seeds = [sample_seed(5, 0, k, True) for k in range(6)]
    # What the model itself gives for each request (the transformers backend keeps "e").
    want = [tiny.generate([A], Sampling(temperature=1.0, max_tokens=24, stop=["e"], seed=x), seeds=[x])[0]
            for x in seeds]
    cut = [k for k, w in enumerate(want) if w.text.endswith("e")]
    assert cut, "no sample reached the stop string"
    out = m.generate([A], s, seeds=[5])
    assert sorted(b["seed"] for b in server.bodies) == sorted(seeds)
    # The server left "e" out (as OpenAI and vLLM do) and named it in `stop_reason`.
    for c, w in zip(out, want):
        assert (c.text, c.finish_reason, c.completion_tokens) == (w.text, w.finish_reason, w.completion_tokens)
    # Without `stop_reason` (as OpenAI): a reply cut by the one stop string gets it back too.
    server.stop_reason = False
    again = m.generate([A], s, seeds=[5])
    for k in cut:
        assert again[k].text == want[k].text and again[k].text.count("e") == 1


def test_restore_stop_rules():
    from leafe.models.litellm import restore_stop

    # The server said which stop string matched, or that none did (None / a token id).
    assert restore_stop("go <a>x", "stop", ["</a>", "\n"], True, "</a>") == ("go <a>x</a>", "stop")
    assert restore_stop("go <a>x", "stop", ["</a>"], True, None) == ("go <a>x", "stop")
    assert restore_stop("go <a>x", "stop", ["</a>"], True, 151645) == ("go <a>x", "stop")
    # The server says nothing: one stop string is put back, several are ambiguous.
    assert restore_stop("go <a>x", "stop", ["</a>"], False, None) == ("go <a>x</a>", "stop")
    assert restore_stop("go <a>x", "stop", ["</a>", "\n"], False, None) == ("go <a>x", "stop")
    # Never after a length cut; a provider that ignored `stop` is cut client side, stop kept.
    assert restore_stop("go <a>x", "length", ["</a>"], False, None) == ("go <a>x", "length")
    assert restore_stop("<a>x</a> more\nz", "length", ["\n", "</a>"], False, None) == ("<a>x</a>", "stop")
    assert restore_stop("<a>x</a>", "stop", ["</a>"], False, None) == ("<a>x</a>", "stop")


def test_concurrency_is_bounded(make, server):
    server.latency = 0.3  # every request waits, so requests overlap at the server
    out = make(concurrency=2).generate([A, B, A], Sampling(temperature=1.0, max_tokens=2, n=2), seeds=[1, 2, 3])
    assert all(c.error is None for c in out)
    assert server.requests == 6 and server.max_in_flight == 2
    server.reset_counts()
    make(concurrency=8).generate([A, B, A], Sampling(temperature=1.0, max_tokens=2, n=2), seeds=[1, 2, 3])
    assert server.requests == 6 and server.max_in_flight > 2


def test_generate_from_a_thread_with_a_running_loop(make):
    m = make()

    async def inside():
        return m.generate([A], QUICK, seeds=[1])

    (c,) = asyncio.run(inside())
    assert c.error is None and c.completion_tokens > 0


# ------------------------------------------------------------------------------- faults


@pytest.mark.parametrize(
    "fault",
    [Fault.rate_limit(retry_after=None), Fault.server_error(), Fault.malformed(), Fault.drop()],
    ids=lambda f: f.kind,
)
def test_transient_fault_is_retried(make, server, caplog, fault):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    m = make()
    server.inject(fault)
    (c,) = m.generate([A], QUICK, seeds=[1])
    assert c.error is None and c.completion_tokens > 0 and c.retries == 1
    assert m.usage.retries == 1 and m.usage.errors == 0
    assert server.requests == 2 and server.counts == {fault.kind: 1, "ok": 1}
    (msg,) = warnings_of(caplog)
    assert "attempt 1 of 5" in msg and "retrying in" in msg and "conversation 0, sample 0" in msg
    assert KEY not in caplog.text


def test_several_faults_then_success(make, server, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    m = make()
    server.inject(Fault.server_error(), Fault.drop(), Fault.malformed(), Fault.rate_limit(retry_after=0))
    (c,) = m.generate([A], QUICK, seeds=[1])
    assert c.error is None and c.retries == 4
    assert server.requests == 5
    msgs = warnings_of(caplog)
    assert [f"attempt {k} of 5" in msg for k, msg in enumerate(msgs, 1)] == [True] * 4
    assert "500" in msgs[0] and "429" in msgs[3]


def test_retry_after_is_honoured_and_capped(make, server, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    m = make(backoff=0.01, backoff_max=5.0)
    server.inject(Fault.rate_limit(retry_after=1.2))
    t0 = time.monotonic()
    (c,) = m.generate([A], QUICK, seeds=[1])
    assert time.monotonic() - t0 >= 1.2
    assert c.error is None and c.retries == 1 and server.requests == 2
    assert "retrying in 1.20 s" in warnings_of(caplog)[0]
    # A Retry-After longer than backoff_max waits backoff_max.
    caplog.clear()
    m2 = make(backoff=0.01, backoff_max=0.2)
    server.inject(Fault.rate_limit(retry_after=60))
    t0 = time.monotonic()
    (c,) = m2.generate([A], QUICK, seeds=[1])
    assert time.monotonic() - t0 < 20 and c.error is None
    assert "retrying in 0.20 s" in warnings_of(caplog)[0]


def test_timeout_is_retried(make, server, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    m = make(timeout=3.0)
    server.inject(Fault.slow(60))
    t0 = time.monotonic()
    (c,) = m.generate([A], QUICK, seeds=[1])
    assert time.monotonic() - t0 >= 3.0
    assert c.error is None and c.retries == 1
    assert server.requests == 2 and server.counts == {"slow": 1, "ok": 1}
    assert "timeout" in warnings_of(caplog)[0].lower()


def test_exhausted_retries_give_an_errored_completion(make, server):
    m = make(max_retries=2)
    server.plan = lambda n, body: Fault.server_error() if body["messages"] == FAIL else None
    bad, good = m.generate([FAIL, A], QUICK, seeds=[1, 2])
    assert (bad.text, bad.finish_reason, bad.retries, bad.completion_tokens) == ("", "error", 2, 0)
    assert "500" in bad.error and "2 retries" in bad.error
    assert good.error is None and good.retries == 0
    assert server.requests == 4 and server.counts == {"server_error": 3, "ok": 1}
    assert (m.usage.errors, m.usage.retries, m.usage.samples) == (1, 2, 2)


def test_bad_request_is_not_retried(make, server, caplog):
    caplog.set_level(logging.WARNING, logger=LOGGER)
    m = make()
    server.inject(Fault.bad_request())
    (c,) = m.generate([A], QUICK, seeds=[1])
    assert c.finish_reason == "error" and "400" in c.error and c.retries == 0
    assert server.requests == 1 and warnings_of(caplog) == []


@pytest.mark.parametrize("kind", ["unauthorized", "forbidden", "not_found"])
def test_configuration_errors_raise(make, server, kind):
    m = make()
    server.inject(Fault(kind))
    with pytest.raises(UserError) as e:
        m.generate([A], QUICK, seeds=[1])
    assert server.requests == 1
    assert "openai/loopback" in str(e.value) and KEY not in str(e.value)
    if kind == "not_found":
        assert "api_base" in str(e.value)
    else:
        assert KEY_ENV in str(e.value)
    # The model stays usable (e.g. after the user fixes the key).
    assert m.generate([A], QUICK, seeds=[1])[0].error is None


def test_a_wrong_key_raises(make, server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    m = make()
    with pytest.raises(UserError, match=KEY_ENV):
        m.generate([A, B], QUICK)
    assert 1 <= server.requests <= 2  # no retry; the other request may have been in flight


def test_missing_key_variable(server, monkeypatch):
    from leafe.models.litellm import LiteLLMModel

    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(UserError, match=KEY_ENV):
        LiteLLMModel.from_spec(spec(server))


def test_no_key_at_all(server, monkeypatch):
    from leafe.models.litellm import LiteLLMModel

    # litellm reports the openai client's "Missing credentials" as a 500 (not sent anywhere).
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    m = LiteLLMModel.from_spec(spec(server, api_key_env=None))
    try:
        with pytest.raises(UserError, match="api_key_env"):
            m.generate([A], QUICK)
    finally:
        m.close()
    assert server.requests == 0


def test_reserved_params_are_refused(server):
    from leafe.models.litellm import LiteLLMModel

    with pytest.raises(UserError, match="api_key_env"):
        LiteLLMModel.from_spec(spec(server, params={"api_key": "sk-in-a-spec"}))
    with pytest.raises(UserError, match="max_retries"):
        LiteLLMModel.from_spec(spec(server, params={"num_retries": 3}))


# ------------------------------------------------------------------------------- cache


def test_cache(make, server, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path))
    s = Sampling(temperature=1.0, max_tokens=6, n=3)
    m = make(cache=True)
    a = m.generate([A, B], s, seeds=[1, 2])
    assert server.requests == 6 and not any(c.cached for c in a)
    assert len({c.text for c in a[:3]}) == 3  # sample indices are separate keys
    assert (tmp_path / "litellm").is_dir()
    m.close()
    # A re-run (a new instance) costs no request.
    server.reset_counts()
    m = make(cache=True)
    b = m.generate([A, B], s, seeds=[1, 2])
    assert server.requests == 0
    assert [c.text for c in b] == [c.text for c in a] and all(c.cached for c in b)
    assert [(c.prompt_tokens, c.completion_tokens) for c in b] == [(c.prompt_tokens, c.completion_tokens) for c in a]
    assert m.usage.cached == 6
    # One more sample: only it is requested.
    c4 = m.generate([A], Sampling(temperature=1.0, max_tokens=6, n=4), seeds=[1])
    assert server.requests == 1 and [c.cached for c in c4] == [True, True, True, False]
    # Another seed or other sampling settings are other requests.
    m.generate([A], s, seeds=[3])
    m.generate([A], Sampling(temperature=0.5, max_tokens=6, n=3), seeds=[1])
    assert server.requests == 7


def test_cache_keys_on_the_sample_index(make, server, tmp_path, monkeypatch):
    # No seeds: the requests of the n samples are identical but for their index.
    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path))
    s = Sampling(temperature=1.0, max_tokens=6, n=3)
    a = make(cache=True).generate([A], s)
    assert all("seed" not in b for b in server.bodies) and server.requests == 3
    assert len({c.text for c in a}) == 3
    b = make(cache=True).generate([A], s)
    assert server.requests == 3 and [c.text for c in b] == [c.text for c in a]


def test_errors_are_not_cached(make, server, tmp_path, monkeypatch):
    monkeypatch.setenv("LEAFE_CACHE", str(tmp_path))
    m = make(cache=True, max_retries=0)
    server.inject(Fault.server_error())
    (c,) = m.generate([A], QUICK, seeds=[1])
    assert c.error is not None and server.requests == 1
    (c,) = m.generate([A], QUICK, seeds=[1])
    assert c.error is None and not c.cached and server.requests == 2
    (c,) = m.generate([A], QUICK, seeds=[1])
    assert c.cached and server.requests == 2


def test_no_cache_by_default(make, server):
    m = make()
    m.generate([A], QUICK, seeds=[1])
    m.generate([A], QUICK, seeds=[1])
    assert server.requests == 2


# ------------------------------------------------------------------------------- loading


def test_loopback_lists_its_model(server):
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"{server.api_base}/models", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert [m["id"] for m in json.load(r)["data"]] == ["loopback"]
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{server.api_base}/models", timeout=10)
    assert e.value.code == 401


def test_loopback_chat_completion(server):
    import json
    import urllib.error
    import urllib.request

    def post(body):
        req = urllib.request.Request(f"{server.api_base}/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    body = {"model": "loopback", "messages": A, "temperature": 1.0, "max_tokens": 5, "n": 3, "seed": 4}
    r = post(body)
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] in ("stop", "length") for c in r["choices"])
    u = r["usage"]
    assert u["prompt_tokens"] > 0 and 3 <= u["completion_tokens"] <= 15
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert [c["message"]["content"] for c in post(body)["choices"]] == [c["message"]["content"] for c in r["choices"]]
    with pytest.raises(urllib.error.HTTPError) as e:
        post({"model": "loopback", "messages": []})
    assert e.value.code == 400
    assert server.requests == 3 and server.counts == {"ok": 3}


def test_load_through_the_registry(server):
    from leafe.models.litellm import LiteLLMModel

    m = models.load(model_spec(backend="litellm", name="openai/loopback", api_base=server.api_base,
                               api_key_env=KEY_ENV, temperature=0.3, max_tokens=5))
    try:
        assert isinstance(m, LiteLLMModel)
        (c,) = m.generate([A], models.sampling_from(m.spec))
        assert c.error is None and 0 < c.completion_tokens <= 5
        assert server.bodies[-1]["temperature"] == 0.3 and server.bodies[-1]["max_tokens"] == 5
        prov = m.provenance()
        assert prov["backend"] == "litellm" and prov["name"] == "openai/loopback"
        assert prov["api_base"] == server.api_base and prov["cache"] is False
        assert (prov["temperature"], prov["max_tokens"]) == (0.3, 5)
        assert KEY not in repr(prov)
    finally:
        m.close()
    assert not m._loop.thread.is_alive()


# ------------------------------------------------------------------------------- replicas


def test_requests_spread_over_several_servers_with_the_same_replies(make, server, tiny):
    """`api_bases`: litellm's Router sends each request to one of the replicas; seeded
    sampling makes the replies independent of which server answered."""
    from leafe.models.litellm import LiteLLMModel

    convs = [A, B] * 8
    s = Sampling(temperature=1.0, max_tokens=5)
    want = make().generate(convs, s, seeds=list(range(16)))
    with LoopbackServer(tiny, api_key=KEY) as other:
        server.reset_counts()
        m = LiteLLMModel.from_spec(spec(server, api_base=None, api_bases=[server.api_base, other.api_base]))
        try:
            got = m.generate(convs, s, seeds=list(range(16)))
        finally:
            m.close()
        assert [c.text for c in got] == [c.text for c in want]
        assert all(c.error is None for c in got)
        assert server.requests > 0 and other.requests > 0  # both replicas served
        assert server.requests + other.requests == 16
        assert m.provenance()["api_bases"] == [server.api_base, other.api_base]


def test_api_base_and_api_bases_are_exclusive(server):
    with pytest.raises(ValueError, match="either api_base"):
        spec(server, api_bases=[server.api_base, server.api_base + "x"])
