"""Judging one submission: build the program and the test job, run it in the sandbox, and
turn what happened into a verdict and feedback text.

Feedback never contains timings or host paths, so the same submission gets the same text
(restore by replay stays exact for deterministic programs).
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from leafe.envs.coding.datasets import Problem, Test
from leafe.envs.coding.sandbox import RunResult, Sandbox, trim

HARNESS = Path(__file__).with_name("harness.py")

VERDICT_TEXT = {
    "passed": "passed",
    "wrong_answer": "wrong answer",
    "runtime_error": "runtime error",
    "timeout": "time limit exceeded",
    "compile_error": "syntax error",
    "missing_function": "missing function",
    "output_limit": "output limit exceeded",
    "memory_limit": "memory limit exceeded",
    "crashed": "crashed",
    "empty": "empty submission",
}

_FENCE = re.compile(r"^\s*```[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:\n?```\s*)?$", re.DOTALL)


def clean_code(action: str) -> str:
    """The code of an action: a whole fenced block is unwrapped (actions parsed by the preset's
    regex arrive without fences; a passthrough reply may still have them)."""
    # Lone surrogates (possible in decoded model output) cannot be written as UTF-8.
    action = action.encode("utf-8", "replace").decode("utf-8")
    m = _FENCE.match(action)
    return (m.group(1) if m else action).strip("\n")


def build_program(problem: Problem, code: str) -> tuple[str, str]:
    """(prelude, program): the prelude runs first in the program's namespace. For HumanEval the
    prelude is the prompt (its imports and helper functions) and the program the submission,
    which redefines the function, so tracebacks give the submission's own line numbers; a
    submission with no top-level definition at all is taken as the function's body (as in
    HumanEval completions) and appended to the prompt. Otherwise: no prelude, the submission itself."""
    if problem.prompt is None or problem.entry_point is None:
        return "", code + "\n"
    defines = re.search(rf"^\s*(async\s+)?def\s+{re.escape(problem.entry_point)}\s*\(", code,
                        re.MULTILINE)
    # Top-level definitions without the entry point: a whole program missing the function (the
    # harness says so), not a body.
    top_level = re.search(r"^(async\s+def|def|class)\s", code, re.MULTILINE)
    if defines or top_level:
        return problem.prompt, code + "\n"
    body = textwrap.indent(textwrap.dedent(code), "    ")
    return "", problem.prompt.rstrip("\n") + "\n" + body + "\n"


@dataclass
class Verdict:
    """The outcome of one submission."""

    passed: bool
    verdict: str
    """A key of VERDICT_TEXT."""
    tests_total: int
    tests_passed: int
    """Tests passed before the first failure (tests run in order and stop at it)."""
    failed: Test | None = None
    failed_index: int | None = None
    """Index of the failing test among the tests run; -1: before any test (load/compile)."""
    failed_kind_index: int | None = None
    """1-based position of the failing test among the tests of its kind."""
    failed_kind_total: int | None = None
    """How many tests of that kind were selected."""
    details: dict = field(default_factory=dict)
    """assert, input, expected, got, error, traceback (whatever applies)."""
    stdout: str = ""
    stderr: str = ""
    duration: float = 0.0


def selected_tests(problem: Problem, kinds: list[str], max_generated: int | None) -> list[Test]:
    """The tests that decide success, public first, then private, then generated."""
    out: list[Test] = []
    for kind in ("public", "private", "generated"):
        if kind not in kinds:
            continue
        tests = [t for t in problem.tests if t.kind == kind]
        if kind == "generated" and max_generated is not None:
            tests = tests[:max_generated]
        out += tests
    return out


def outputs_match(got: str, expected: str, tol: float = 1e-6) -> bool:
    """Whitespace-insensitive token comparison; tokens that are both decimal numbers with a
    fraction or exponent may differ by `tol` (absolute or relative)."""
    a, b = got.split(), expected.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        if not any(c in y for c in ".eE") or not any(c in x for c in ".eE"):
            return False
        try:
            fx, fy = float(x), float(y)
        except ValueError:
            return False
        if not abs(fx - fy) <= tol * max(1.0, abs(fy)):
            return False
    return True


def judge(problem: Problem, code: str, sandbox: Sandbox, tests: list[Test], *,
          test_timeout: float, output_limit: int) -> Verdict:
    """Run `code` against `tests` (in order, stopping at the first failure)."""
    prelude, program = build_program(problem, code)
    files = {"harness.py": HARNESS.read_text(encoding="utf-8"), "solution.py": program}
    n = len(tests)
    state: dict = {"passed": 0, "fail": None, "started": None, "done": False}

    if problem.mode == "function":
        job = {"mode": "function", "prelude": prelude, "setup": problem.setup,
               "targets": problem.targets,
               "call_names": problem.call_names, "test_timeout": test_timeout,
               "tests": [{"src": t.src} for t in tests]}

        def on_event(ev: dict) -> bool:
            kind = ev.get("e")
            if kind == "start":
                state["started"] = ev.get("i")
            elif kind == "pass":
                state["passed"] += 1
            elif kind == "fail":
                state["fail"] = ev
                return False
            elif kind == "done":
                state["done"] = True
            return True
    else:
        job = {"mode": "stdio", "test_timeout": test_timeout, "output_limit": output_limit,
               "tests": [{"input": t.input} for t in tests]}

        def on_event(ev: dict) -> bool:
            kind = ev.get("e")
            if kind == "start":
                state["started"] = ev.get("i")
            elif kind == "fail":  # compile error
                state["fail"] = ev
                return False
            elif kind == "ran":
                i = ev.get("i")
                if not isinstance(i, int) or not 0 <= i < n:
                    return True
                fail = _stdio_failure(ev, tests[i])
                if fail:
                    state["fail"] = fail
                    return False
                state["passed"] += 1
            elif kind == "done":
                state["done"] = True
            return True

    files["job.json"] = json.dumps(job)
    run = sandbox.run("harness.py", [], files, on_event=on_event, keep_events=False)
    v = _verdict(run, state, tests)
    if v.failed is not None and v.failed_index is not None:
        v.failed_kind_index = sum(1 for t in tests[: v.failed_index + 1]
                                  if t.kind == v.failed.kind)
        v.failed_kind_total = sum(1 for t in tests if t.kind == v.failed.kind)
    return v


def _stdio_failure(ev: dict, test: Test) -> dict | None:
    got = ev.get("stdout") or ""
    stderr = ev.get("stderr") or ""
    base = {"e": "fail", "i": ev.get("i"), "got": got, "stderr": stderr}
    if ev.get("timeout"):
        return {**base, "verdict": "timeout"}
    sig = ev.get("signal")
    if sig == "SIGXCPU":
        return {**base, "verdict": "timeout"}
    if ev.get("truncated") or "File too large" in stderr:
        return {**base, "verdict": "output_limit"}
    if ev.get("exit") not in (0, None) or sig:
        verdict = "memory_limit" if "MemoryError" in stderr else "runtime_error"
        return {**base, "verdict": verdict, "exit": ev.get("exit"), "signal": sig}
    if not outputs_match(got, test.output or ""):
        return {**base, "verdict": "wrong_answer"}
    return None


def _verdict(run: RunResult, state: dict, tests: list[Test]) -> Verdict:
    n = len(tests)
    v = Verdict(passed=False, verdict="crashed", tests_total=n, tests_passed=state["passed"],
                stdout=run.stdout, stderr=run.stderr, duration=run.duration)
    fail = state["fail"]
    if fail is not None:
        i = fail.get("i")
        v.verdict = fail.get("verdict") or "crashed"
        if v.verdict == "test_error":  # the problem's own tests are broken
            v.verdict = "crashed"
        v.failed_index = i if isinstance(i, int) else None
        if isinstance(i, int) and 0 <= i < n:
            v.failed = tests[i]
        v.details = {k: fail[k] for k in ("assert", "input", "expected", "got", "error",
                                          "traceback", "missing", "phase", "stderr", "exit",
                                          "signal") if fail.get(k) is not None}
        if v.verdict == "runtime_error" and "MemoryError" in str(v.details.get("error", "")):
            v.verdict = "memory_limit"
        return v
    if state["done"] and state["passed"] == n and not (run.timed_out or run.flooded):
        v.passed, v.verdict = True, "passed"
        return v
    # The run ended without a verdict: killed by the wall clock or a limit, or it exited.
    i = state["started"]
    if isinstance(i, int) and 0 <= i < n:
        v.failed_index, v.failed = i, tests[i]
    elif state["started"] is None:
        v.failed_index = -1
    if run.timed_out:
        v.verdict = "timeout"
        v.details["whole_run"] = True
    elif run.flooded:
        v.verdict = "output_limit"
    elif run.signal_name == "SIGXCPU":
        v.verdict = "timeout"
    elif run.signal_name == "SIGKILL" or "MemoryError" in run.stderr:
        v.verdict = "memory_limit" if "MemoryError" in run.stderr else "crashed"
        v.details["signal"] = run.signal_name
    else:
        v.verdict = "crashed"
        v.details["exit"] = run.returncode
    return v


# -- feedback text -------------------------------------------------------------------------------
def _block(label: str, text: str, limit: int) -> str:
    text = trim(text.rstrip("\n"), limit)
    if "\n" in text:
        return f"{label}:\n{text}"
    return f"{label}: {text}"


def feedback(v: Verdict, problem: Problem, *, show_hidden: bool, limit: int,
             time_limit: float, whole_limit: float) -> str:
    """What the agent reads about a submission (see the module docstring)."""
    if v.passed:
        n = v.tests_total
        return f"PASSED: all {n} tests passed." if n != 1 else "PASSED: the test passed."
    lines: list[str] = []
    what = VERDICT_TEXT.get(v.verdict, v.verdict)
    test = v.failed
    hidden = test is not None and test.kind != "public" and not show_hidden
    d = v.details
    if v.failed_index == -1 or (test is None and v.verdict in ("compile_error",
                                                                "missing_function")):
        if v.verdict == "compile_error":
            lines.append("FAILED: syntax error, your code does not compile.")
        elif v.verdict == "missing_function":
            names = ", ".join(f"`{m}`" for m in d.get("missing", []))
            lines.append(f"FAILED: your code does not define {names}, which the tests call.")
        elif v.verdict == "timeout":
            lines.append(f"FAILED: {what} while loading your code (limit {time_limit:g} s).")
        else:
            lines.append(f"FAILED: {what} while loading your code, before any test ran.")
    elif test is None:
        lines.append(f"FAILED: {what}.")
    else:
        where = f"{test.kind} test {v.failed_kind_index} of {v.failed_kind_total}"
        if hidden:
            lines.append(f"FAILED: {what} on a hidden test ({where}); "
                         f"{v.tests_passed} of {v.tests_total} tests passed before it.")
        elif v.tests_total == 1:
            lines.append(f"FAILED: {what}.")
        else:
            lines.append(f"FAILED: {what} on {where}.")
    if v.verdict == "timeout" and v.failed_index != -1:
        if d.get("whole_run"):
            lines.append(f"The run exceeded its total time limit of {whole_limit:g} s.")
        else:
            lines.append(f"Time limit: {time_limit:g} s per test.")
    if v.verdict == "output_limit":
        lines.append("Your program wrote too much output.")
    if not hidden:
        if test is not None and problem.mode == "stdio":
            lines.append(_block("Input", test.input or "", limit))
            lines.append(_block("Expected output", test.output or "", limit))
            if v.verdict in ("wrong_answer", "output_limit", "runtime_error", "memory_limit",
                             "timeout"):
                lines.append(_block("Your output", d.get("got", "") or "(nothing)", limit))
        if d.get("assert"):
            lines.append(_block("Test", d["assert"], limit))
        if d.get("input"):
            lines.append(_block("Call", d["input"], limit))
        if "expected" in d:
            lines.append(_block("Expected", d["expected"], limit))
        if "got" in d and problem.mode == "function":
            lines.append(_block("Got", d["got"], limit))
    if d.get("error"):
        # The exception type and message (hidden tests: the type only).
        err = d["error"] if not hidden else d["error"].split(":", 1)[0]
        lines.append(_block("Error", err, limit))
        if d.get("traceback") and not hidden:
            lines.append(_block("Traceback (your code)", d["traceback"], limit))
    elif d.get("stderr") and not hidden and v.verdict in ("runtime_error", "memory_limit",
                                                           "timeout", "output_limit"):
        lines.append(_block("Stderr", d["stderr"], limit))
    if d.get("signal") and v.verdict in ("crashed", "memory_limit", "runtime_error"):
        lines.append(f"Your program was killed by {d['signal']}.")
    if d.get("exit") is not None and v.verdict == "crashed":
        lines.append(f"Your program exited (status {d['exit']}) before the tests finished.")
    if not hidden:
        if v.stdout.strip():
            lines.append(_block("Stdout", v.stdout, limit))
        if v.stderr.strip() and not d.get("error") and not d.get("stderr"):
            lines.append(_block("Stderr", v.stderr, limit))
    return "\n".join(lines)
