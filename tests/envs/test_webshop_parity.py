"""The parity worker's protocol and errors, against a fake `web_agent_site` (a test double
of the original's `WebAgentTextEnv`, put on the worker's path in a temp dir). The real
original is not installable here."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from leafe import envs
from leafe.envs.webshop.parity import OriginalWebShop, compare
from leafe.errors import UserError

pytest.importorskip("bm25s")

FAKE = '''
print("Products loaded.")  # the original prints to stdout: must not break the protocol
import os
class WebAgentTextEnv:
    def __init__(self, observation_mode="html", **kwargs):
        self.mode, self.kwargs = observation_mode, kwargs
        if kwargs.get("fail"):
            raise FileNotFoundError("data/items_shuffle_1000.json")
    def reset(self, session=None, instruction_text=None):
        print("resetting", session)
        self.session, self.page = session, "index"
        self.instruction_text = f"goal {session} ({self.mode}, human={self.kwargs.get('human_goals')})"
        return f"WebShop [SEP] Instruction: [SEP] {self.instruction_text} [SEP] Search", None
    def get_available_actions(self):
        if self.page == "index":
            return {"has_search_bar": True, "clickables": ["search"]}
        if self.page == "done":
            return {"has_search_bar": False, "clickables": []}
        return {"has_search_bar": False, "clickables": ["back to search", "buy now"]}
    def step(self, action):
        if action == "crash[]":
            os._exit(3)
        if action == "raise[]":
            raise ValueError("boom")
        if action.startswith("search["):
            self.page = "results"
        if action == "click[buy now]" and self.page == "results":
            self.page = "done"
            return "Thank you", 1.0, True, None
        return f"page {self.page}", 0, False, None
'''


@pytest.fixture()
def fake_original(tmp_path: Path) -> Path:
    pkg = tmp_path / "WebShop" / "web_agent_site"
    (pkg / "envs").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "envs" / "__init__.py").write_text(textwrap.dedent(FAKE))
    return tmp_path / "WebShop"


def test_worker_serves_reset_and_step(fake_original):
    w = OriginalWebShop(sys.executable, str(fake_original), "text_rich", {"human_goals": True})
    try:
        obs = w.reset("test-00007", 7)
        assert obs.task == "goal 7 (text_rich, human=True)"
        assert obs.text.endswith("[SEP] Search")
        assert obs.admissible == ["search[<your query>]", "click[search]"]
        s = w.step("click[search]")  # a no-op in the original: not valid
        assert (s.reward, s.done, s.valid) == (0.0, False, False)
        s = w.step("search[shoes]")
        assert s.valid and s.observation.text == "page results"
        assert s.observation.admissible == ["click[back to search]", "click[buy now]"]
        s = w.step("click[buy now]")
        assert (s.reward, s.done, s.success) == (1.0, True, True)
        assert s.observation.info["R"] == 1.0
        with pytest.raises(RuntimeError, match="ValueError: boom"):
            w.step("raise[]")
        with pytest.raises(RuntimeError, match=r"exited \(code 3\)"):
            w.step("crash[]")
    finally:
        w.close()


def test_env_with_source_original(fake_original, tmp_path):
    from leafe.envs.webshop import write_synthetic_catalogue

    data = write_synthetic_catalogue(tmp_path / "data", n_products=12)
    kw = dict(data_dir=str(data), synthetic_products=12, noun_tagger="simple", test_size=3,
              eval_size=3)
    orig = envs.make("webshop", source="original", python=sys.executable,
                     original_path=str(fake_original), **kw)
    ours = envs.make("webshop", **kw)
    try:
        obs = orig.reset("eval-00001")
        assert obs.task.startswith("goal 4 ")  # eval starts at goal 3
        diffs = compare(ours, orig, "test-00000", ["search[shoes]", "click[buy now]"])
        assert diffs and diffs[0]["step"] == 0 and diffs[0]["field"] == "observation"
        assert orig.describe()["source"] == "original"
    finally:
        orig.close()


def test_missing_interpreter_is_a_user_error(tmp_path, fake_original):
    with pytest.raises(UserError, match="not an executable file"):
        OriginalWebShop(str(tmp_path / "nope" / "python"), str(fake_original))
    with pytest.raises(UserError, match="holds no web_agent_site"):
        OriginalWebShop(sys.executable, str(tmp_path))


def test_interpreter_without_the_original_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"did not start.*ModuleNotFoundError.*web_agent_site"):
        OriginalWebShop(sys.executable, None)


def test_original_failing_to_load_is_a_user_error(fake_original):
    with pytest.raises(UserError, match="FileNotFoundError: data/items_shuffle_1000.json"):
        OriginalWebShop(sys.executable, str(fake_original), env_kwargs={"fail": True})


def test_broken_interpreter_is_a_user_error(tmp_path):
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'not python' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(UserError, match=r"(?s)exited \(code 1\).*not python.*interpreter"):
        OriginalWebShop(str(broken))
