"""Runs the original WebShop `WebAgentTextEnv` and serves it over JSON lines.

Started by `leafe.envs.webshop.parity` in the user's interpreter (the original's
environment: Python <= 3.10, gym, pyserini, spaCy...). It imports nothing from leafe.

Protocol (one JSON object per line): the first line from leafe is the configuration
`{"original_path": str | null, "env_kwargs": {...}}`; the worker answers `{"ok": true,
"ready": true}` or `{"ok": false, "error": "..."}`. Then requests `{"op": "reset",
"session": int}`, `{"op": "step", "action": str}`, `{"op": "close"}`; answers carry `obs`,
`instruction`, `reward`, `done`, `valid` and `available` (the original's
`get_available_actions()`). The original prints progress to stdout: the worker moves file
descriptor 1 onto stderr so that only protocol lines reach leafe.
"""

import json
import os
import re
import sys
import traceback

_ACTION = re.compile(r"(.+)\[(.+)\]")


def _valid(action, available):
    """Whether the original acts on `action` (its own parsing and checks)."""
    m = _ACTION.match(action)
    if m is None:
        return False
    name, arg = m.group(1), m.group(2).lower()
    if name == "search":
        return arg != ""
    return name == "click" and arg in available["clickables"] and arg != "search"


def main():
    out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
    os.dup2(2, 1)  # the original's prints (and its libraries') go to stderr
    sys.stdout = sys.stderr

    def send(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    config = json.loads(sys.stdin.readline())
    if config.get("original_path"):
        sys.path.insert(0, config["original_path"])
        os.chdir(config["original_path"])  # the original resolves some paths from its root
    try:
        from web_agent_site.envs import WebAgentTextEnv

        env = WebAgentTextEnv(**config.get("env_kwargs", {}))
    except BaseException as e:  # noqa: BLE001 - report any start failure to leafe
        send({"ok": False, "error": f"{type(e).__name__}: {e}",
              "traceback": traceback.format_exc()})
        return
    send({"ok": True, "ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        op = req.get("op")
        try:
            if op == "close":
                send({"ok": True})
                return
            if op == "reset":
                obs, _ = env.reset(session=int(req["session"]))
                send({"ok": True, "obs": obs, "instruction": env.instruction_text,
                      "available": env.get_available_actions()})
            elif op == "step":
                valid = _valid(req["action"], env.get_available_actions())
                obs, reward, done, _ = env.step(req["action"])
                available = (env.get_available_actions() if not done
                             else {"has_search_bar": False, "clickables": []})
                send({"ok": True, "obs": obs, "reward": float(reward), "done": bool(done),
                      "valid": valid, "available": available})
            else:
                send({"ok": False, "error": f"unknown op {op!r}"})
        except BaseException as e:  # noqa: BLE001
            send({"ok": False, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()})


if __name__ == "__main__":
    main()
