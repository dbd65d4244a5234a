"""User-facing errors: each says what went wrong, where, and how to fix it.

The CLI turns any `UserError` into a message and exit code 2, never a traceback.
"""

#: The most characters of one user value a message quotes (`cut`).
SHOWN = 200


def cut(text: str, limit: int = SHOWN) -> str:
    """`text`, or its first `limit` characters and how long it was: a message quoting a spec
    value must stay readable (and printable in time) when the value is megabytes long."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown(value: object, limit: int = SHOWN) -> str:
    """`repr(value)` for a message, cut to about `limit` characters (a long string is cut
    before `repr` copies it)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    return cut(repr(value), limit)


class UserError(Exception):
    """An error caused by the user's input (spec, flags, missing data or model)."""


class SpecError(UserError):
    """A spec that cannot be read or validated; carries every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class RunDataError(UserError):
    """A run directory's files are not what leafe wrote (damaged or missing records, a
    manifest that is not one); carries one message per problem, each naming the file and
    how to fix it."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class NonDeterministicEnvError(RuntimeError):
    """Replaying an action prefix did not reproduce the recorded observation."""


class EnvWorkerError(RuntimeError):
    """An environment worker process died or hung (and was restarted): the state of every
    environment it hosted is lost. Evaluation re-runs the affected chunk from its start."""


class EnvWorkersExhausted(UserError):
    """More environment workers were replaced in one stage than `runtime.env_workers.max_restarts`
    allows: the stage stops instead of retrying a failure that recurs."""


class EnvWorkersFull(UserError):
    """A batch needs more environments at once than count * envs_per_worker."""
