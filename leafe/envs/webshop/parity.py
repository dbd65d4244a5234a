"""`source: original`: the original WebShop text environment, in another interpreter.

The original needs its own environment (Python <= 3.10, gym, pyserini with Java, spaCy with
en_core_web_sm, its data and search index), so leafe starts `_parity_worker.py` in the
interpreter the user names and talks to it over JSON lines on stdin/stdout. The same
`Env` interface then serves both engines: replay one action script through
`make("webshop", ...)` and `make("webshop", source="original", python=...)` and compare
observations and rewards (`compare`).
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from leafe.envs.base import Observation, Step
from leafe.errors import UserError

WORKER = Path(__file__).with_name("_parity_worker.py")
#: Seconds the original may take to load its data and search index.
START_TIMEOUT = 900.0
#: Seconds one reset or step may take.
STEP_TIMEOUT = 120.0


def admissible(available: dict[str, Any]) -> list[str]:
    """verl-agent's listing of the original's available actions."""
    out = ["search[<your query>]"] if available.get("has_search_bar") else []
    return out + [f"click[{c}]" for c in available.get("clickables", [])]


class OriginalWebShop:
    """A worker process running the original `WebAgentTextEnv`."""

    def __init__(self, python: str, original_path: str | None = None,
                 observation_mode: str = "text", env_kwargs: dict[str, Any] | None = None,
                 start_timeout: float = START_TIMEOUT, step_timeout: float = STEP_TIMEOUT):
        exe = Path(python).expanduser()
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise UserError(
                f"webshop: `python: {python}` is not an executable file; set it to the "
                "interpreter of the original WebShop's environment (e.g. <checkout>/.venv/bin/python)"
            )
        if original_path and not (Path(original_path).expanduser() / "web_agent_site").is_dir():
            raise UserError(
                f"webshop: `original_path: {original_path}` holds no web_agent_site/ folder; set "
                "it to a checkout of github.com/princeton-nlp/WebShop"
            )
        self.step_timeout = step_timeout
        self._stderr = tempfile.TemporaryFile(mode="w+b")
        self._proc = subprocess.Popen(
            [str(exe), "-u", str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr, text=True, encoding="utf-8", start_new_session=True,
        )
        config = {"original_path": str(Path(original_path).expanduser()) if original_path else None,
                  "env_kwargs": {"observation_mode": observation_mode, **(env_kwargs or {})}}
        reply = self._call(config, start_timeout, starting=True)
        if not reply.get("ok"):
            self.close()
            raise UserError(
                f"webshop: the original WebShop did not start in {python}: {reply.get('error')}; "
                "that interpreter must import web_agent_site (set `original_path` to the "
                "checkout) with the original's requirements and data (its setup.sh)"
            )
        self._last_obs = ""
        self._instruction = ""

    def _stderr_tail(self, n: int = 2000) -> str:
        self._stderr.flush()
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - n))
        return self._stderr.read().decode("utf-8", "replace").strip()

    def _call(self, request: dict[str, Any], timeout: float, starting: bool = False) -> dict:
        proc = self._proc
        if not starting and proc.poll() is not None:
            raise RuntimeError(f"webshop: the original's worker has exited (code "
                               f"{proc.returncode}); its stderr ends with:\n{self._stderr_tail()}")
        try:
            proc.stdin.write(json.dumps(request) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass  # the read below reports the exit
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(timeout)
        line = proc.stdout.readline() if ready else None
        if line is None:
            self.close()
            raise RuntimeError(f"webshop: the original's worker gave no answer in {timeout:.0f} s "
                               f"to {request.get('op', 'start')}; stderr ends with:\n{self._stderr_tail()}")
        if not line:
            proc.wait(timeout=5)
            message = (f"webshop: the original's worker exited (code {proc.returncode}) during "
                       f"{request.get('op', 'start')}; its stderr ends with:\n{self._stderr_tail()}")
            if starting:
                raise UserError(message + "\nCheck that `python` is the original WebShop's "
                                "interpreter.")
            raise RuntimeError(message)
        try:
            return json.loads(line)
        except json.JSONDecodeError as e:
            raise RuntimeError(f"webshop: the original's worker wrote a non-protocol line: "
                               f"{line[:200]!r}") from e

    def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = self._call(request, self.step_timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"webshop: the original failed on {request}: {reply.get('error')}\n"
                               f"{reply.get('traceback', '')}")
        return reply

    def reset(self, task_id: str, goal_index: int) -> Observation:
        r = self._request({"op": "reset", "session": goal_index})
        self._instruction = r["instruction"]
        return Observation(text=r["obs"], task=r["instruction"],
                           admissible=admissible(r["available"]),
                           info={"goal_index": goal_index, "source": "original"})

    def step(self, action: str) -> Step:
        r = self._request({"op": "step", "action": str(action)})
        done, reward = r["done"], float(r["reward"])
        success = done and reward == 1.0
        info: dict[str, Any] = {"source": "original"}
        if done:
            info.update(R=reward, success=success)
        obs = Observation(text=r["obs"], task=self._instruction,
                          admissible=admissible(r["available"]), info=info)
        return Step(obs, reward=reward, done=done, success=success, valid=r["valid"])

    def close(self) -> None:
        proc = self._proc
        if proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=5)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                proc.kill()
                proc.wait()
        self._stderr.close()


def compare(env_a: Any, env_b: Any, task_id: str, actions: list[str]) -> list[dict[str, Any]]:
    """Replay `actions` on task `task_id` in both environments; one row per step where they
    differ (observation text, reward or done), empty when they agree throughout."""
    diffs = []
    a, b = env_a.reset(task_id), env_b.reset(task_id)
    if a.text != b.text:
        diffs.append({"step": 0, "field": "observation", "a": a.text, "b": b.text})
    for i, action in enumerate(actions, 1):
        sa, sb = env_a.step(action), env_b.step(action)
        for field, va, vb in (("observation", sa.observation.text, sb.observation.text),
                              ("reward", sa.reward, sb.reward), ("done", sa.done, sb.done)):
            if va != vb:
                diffs.append({"step": i, "action": action, "field": field, "a": va, "b": vb})
        if sa.done or sb.done:
            break
    return diffs
