"""The test runner that executes inside the sandbox (standard library only; run as a script).

    python harness.py JOB_DIR RESULT_FD

JOB_DIR holds `job.json` and `solution.py`. Results go to RESULT_FD as JSON lines:

    {"e": "start", "i": i}                   before test i
    {"e": "pass", "i": i}                    function tests: test i passed
    {"e": "fail", "i": i, ...}               function tests: test i failed (then the run ends);
                                             i = -1: the solution failed to compile or load
    {"e": "ran", "i": i, "stdout": ..., ...} stdio tests: the program's output on test i
                                             (the host compares it and stops the run on a
                                             mismatch; expected outputs never enter the sandbox)
    {"e": "done"}                            every test ran

Function tests (HumanEval, MBPP) run in this process, like the reference evaluators: the
solution is executed as module `solution`, then each test's code runs in a copy of its
namespace, so test helpers (e.g. HumanEval's `check`) cannot shadow the solution's names.
Every `assert` of the test code is rewritten to record the values compared, and calls to the
tested functions are recorded (arguments and result), so a failure can say input, expected
and got. Stdio tests (CodeContests) run the solution as a separate process per test with the
test's input on stdin, a per-test time limit and an output size limit.
"""

import ast
import json
import linecache
import os
import reprlib
import resource
import signal
import subprocess
import sys
import traceback

SOLUTION_FILE = "solution.py"
_MISSING = object()

_repr = reprlib.Repr()
_repr.maxstring = 300
_repr.maxother = 300
_repr.maxlist = _repr.maxtuple = _repr.maxset = _repr.maxfrozenset = _repr.maxdeque = 30
_repr.maxdict = 20
_repr.maxlong = 300
_repr.maxlevel = 4


def short_repr(value):
    try:
        return _repr.repr(value)
    except BaseException as e:  # a user object whose __repr__ raises
        return f"<unrepresentable {type(value).__name__}: {type(e).__name__}>"


class Emitter:
    """Writes events; silent in forked children of the harness (a solution that forks must not
    report twice)."""

    def __init__(self, fd):
        self.fd = fd
        self.pid = os.getpid()

    def __call__(self, **event):
        if os.getpid() != self.pid:
            return
        data = (json.dumps(event) + "\n").encode("utf-8")
        while data:
            n = os.write(self.fd, data)
            data = data[n:]


class TestTimeout(BaseException):
    """Raised by the per-test alarm (a BaseException: `except Exception` does not swallow it)."""


class AssertFailed(BaseException):
    def __init__(self, src, got, expected):
        super().__init__(src)
        self.src, self.got, self.expected = src, got, expected


# -- rewriting the test code ---------------------------------------------------------------------
class _Rewriter(ast.NodeTransformer):
    """`assert L == R` -> evaluate L and R once, record them, fail with both; any other
    `assert X` -> fail when X is false; calls to the tested names -> recorded calls."""

    def __init__(self, source, targets):
        self.source = source
        self.targets = dict(targets)  # called name -> name shown in feedback

    def visit_Call(self, node):
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id in self.targets:
            shown = self.targets[node.func.id]
            return ast.Call(func=ast.Name("__leafe_call__", ast.Load()),
                            args=[node.func, ast.Constant(shown), *node.args],
                            keywords=node.keywords)
        return node

    def visit_Assert(self, node):
        src = ast.get_source_segment(self.source, node) or ast.unparse(node)
        test = self.visit(node.test)
        at = ast.Expr(ast.Call(ast.Name("__leafe_at__", ast.Load()), [ast.Constant(src)], []))
        if (isinstance(test, ast.Compare) and len(test.ops) == 1
                and isinstance(test.ops[0], ast.Eq)):
            left = ast.Name("__leafe_left__", ast.Store())
            right = ast.Name("__leafe_right__", ast.Store())
            stmts = [
                at,
                ast.Assign([left], test.left),
                ast.Assign([right], test.comparators[0]),
                ast.If(
                    ast.UnaryOp(ast.Not(), ast.Compare(ast.Name("__leafe_left__", ast.Load()),
                                                       [ast.Eq()],
                                                       [ast.Name("__leafe_right__", ast.Load())])),
                    [ast.Expr(ast.Call(ast.Name("__leafe_fail__", ast.Load()),
                                       [ast.Constant(src), ast.Name("__leafe_left__", ast.Load()),
                                        ast.Name("__leafe_right__", ast.Load())], []))],
                    [],
                ),
            ]
        else:
            stmts = [at, ast.If(ast.UnaryOp(ast.Not(), test),
                                [ast.Expr(ast.Call(ast.Name("__leafe_fail__", ast.Load()),
                                                   [ast.Constant(src)], []))], [])]
        for s in stmts:
            ast.copy_location(s, node)
        return stmts


def rewrite(source, filename, targets):
    tree = ast.parse(source, filename)
    tree = _Rewriter(source, targets).visit(tree)
    ast.fix_missing_locations(tree)
    return compile(tree, filename, "exec")


class Recorder:
    """The last outermost call to a tested function and the assert being evaluated."""

    def __init__(self):
        self.depth = 0
        self.call = None  # {"input": ..., "got": ...}
        self.assert_src = None

    def at(self, src):
        # The last call stays: a test may call the function before asserting on the result.
        self.assert_src = src

    def reset(self):
        self.assert_src = self.call = None

    def record(self, fn, name, *args, **kwargs):
        if self.depth:
            return fn(*args, **kwargs)
        parts = [short_repr(a) for a in args] + [f"{k}={short_repr(v)}" for k, v in kwargs.items()]
        call = {"input": f"{name}({', '.join(parts)})"}
        self.call = call
        self.depth += 1
        try:
            result = fn(*args, **kwargs)
        finally:
            self.depth -= 1
        call["got"] = short_repr(result)
        return result

    def fail(self, src, got=_MISSING, expected=_MISSING):
        raise AssertFailed(src, got, expected)


# -- error reports -------------------------------------------------------------------------------
def _error_fields(exc, solution_path):
    """Exception type and message, and a traceback trimmed to the solution's own frames."""
    fields = {"error": "".join(traceback.format_exception_only(type(exc), exc)).strip()}
    if isinstance(exc, SyntaxError):
        return fields
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == solution_path]
    if frames:
        lines = traceback.format_list(frames[-6:])
        fields["traceback"] = "".join(lines).rstrip()
    return fields


# -- function tests ------------------------------------------------------------------------------
def run_function_tests(job, job_dir, emit):
    path = os.path.join(job_dir, SOLUTION_FILE)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    # Register the source so tracebacks show the solution's lines.
    linecache.cache[SOLUTION_FILE] = (len(source), None, source.splitlines(True), SOLUTION_FILE)
    timeout = float(job.get("test_timeout") or 0)

    def on_alarm(signum, frame):
        raise TestTimeout()

    signal.signal(signal.SIGALRM, on_alarm)

    def timed(fn):
        if timeout:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    try:
        code = compile(source, SOLUTION_FILE, "exec")
    except (SyntaxError, ValueError) as e:
        emit(e="fail", i=-1, verdict="compile_error", **_error_fields(e, SOLUTION_FILE))
        return
    ns = {"__name__": "solution", "__file__": SOLUTION_FILE, "__builtins__": __builtins__}
    prelude = job.get("prelude") or ""
    try:
        if prelude:  # the problem's own code (HumanEval's prompt): trusted to load
            exec(compile(prelude, "<prompt>", "exec"), ns)
    except BaseException as e:
        emit(e="fail", i=-1, verdict="test_error", **_error_fields(e, "<prompt>"))
        return
    targets = list(job.get("targets", []))
    stubs = {t: ns.get(t) for t in targets}  # what the prelude defined (HumanEval: a stub)
    try:
        timed(lambda: exec(code, ns))
    except TestTimeout:
        emit(e="fail", i=-1, verdict="timeout", phase="load")
        return
    except BaseException as e:
        emit(e="fail", i=-1, verdict="runtime_error", phase="load",
             **_error_fields(e, SOLUTION_FILE))
        return
    missing = [t for t in targets
               if not callable(ns.get(t)) or (stubs[t] is not None and ns.get(t) is stubs[t])]
    if missing:
        emit(e="fail", i=-1, verdict="missing_function", missing=missing)
        return
    rec = Recorder()
    test_ns = dict(ns)
    test_ns.update(__name__="__leafe_tests__", __leafe_call__=rec.record, __leafe_at__=rec.at,
                   __leafe_fail__=rec.fail)
    # Calls by these names in the test code are recorded (HumanEval's `candidate` is shown
    # under the entry point's name).
    names = {t: t for t in targets}
    names.update(job.get("call_names", {}))
    setup = job.get("setup") or ""
    try:
        if setup:
            exec(rewrite(setup, "<tests>", names), test_ns)
        compiled = [rewrite(t["src"], "<tests>", names) for t in job["tests"]]
    except BaseException as e:  # the tests themselves are broken: not the solution's fault
        emit(e="fail", i=-1, verdict="test_error", **_error_fields(e, "<tests>"))
        return
    for i, test in enumerate(compiled):
        emit(e="start", i=i)
        rec.reset()
        try:
            timed(lambda: exec(test, test_ns))
        except AssertFailed as e:
            out = {"verdict": "wrong_answer", "assert": e.src}
            if e.got is not _MISSING:
                out["got"] = short_repr(e.got)
                out["expected"] = short_repr(e.expected)
            if rec.call:
                out["input"] = rec.call["input"]
                if "got" not in out and "got" in rec.call:
                    out["got"] = rec.call["got"]
            emit(e="fail", i=i, **out)
            return
        except TestTimeout:
            out = {"verdict": "timeout", "assert": rec.assert_src}
            if rec.call:
                out["input"] = rec.call["input"]
            emit(e="fail", i=i, **out)
            return
        except BaseException as e:
            out = {"verdict": "runtime_error", "assert": rec.assert_src,
                   **_error_fields(e, SOLUTION_FILE)}
            if rec.call:
                out["input"] = rec.call["input"]
            emit(e="fail", i=i, **out)
            return
        emit(e="pass", i=i)
    emit(e="done")


# -- stdio tests ---------------------------------------------------------------------------------
def _read_capped(path, limit):
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


def _tail(path, limit):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size > limit:
            f.seek(size - limit)
        return f.read().decode("utf-8", "replace")


def run_stdio_tests(job, job_dir, emit):
    path = os.path.join(job_dir, SOLUTION_FILE)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    try:
        compile(source, SOLUTION_FILE, "exec")
    except (SyntaxError, ValueError) as e:
        emit(e="fail", i=-1, verdict="compile_error", **_error_fields(e, SOLUTION_FILE))
        return
    timeout = float(job["test_timeout"])
    out_limit = int(job["output_limit"])
    cpu = max(1, int(timeout + 0.999))
    scratch = os.path.join(os.getcwd(), ".leafe-harness")
    os.makedirs(scratch, exist_ok=True)
    work = os.path.join(os.getcwd(), "work")
    os.makedirs(work, exist_ok=True)
    in_path, out_path, err_path = (os.path.join(scratch, n) for n in ("in", "out", "err"))

    def limits():
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (out_limit + 1, out_limit + 1))

    for i, test in enumerate(job["tests"]):
        emit(e="start", i=i)
        with open(in_path, "w", encoding="utf-8") as f:
            f.write(test["input"])
        with open(in_path, "rb") as fin, open(out_path, "wb") as fout, \
                open(err_path, "wb") as ferr:
            proc = subprocess.Popen([sys.executable, "-s", "-B", path], stdin=fin, stdout=fout,
                                    stderr=ferr, cwd=work, start_new_session=True,
                                    preexec_fn=limits)
            timed_out = False
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the program's children too
            except (ProcessLookupError, PermissionError):
                pass
            code = proc.wait()
        stdout, truncated = _read_capped(out_path, out_limit)
        sig = None
        if code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = str(-code)
        emit(e="ran", i=i, stdout=stdout, truncated=truncated, exit=code, signal=sig,
             timeout=timed_out, stderr=_tail(err_path, 4000).replace(path, SOLUTION_FILE))
    emit(e="done")


def main():
    job_dir, fd = sys.argv[1], int(sys.argv[2])
    emit = Emitter(fd)
    with open(os.path.join(job_dir, "job.json"), encoding="utf-8") as f:
        job = json.load(f)
    if job["mode"] == "function":
        run_function_tests(job, job_dir, emit)
    else:
        run_stdio_tests(job, job_dir, emit)


if __name__ == "__main__":
    main()
