"""leafe: the reference implementation of LEAFE (arXiv 2603.16843).

Reflect on environment feedback, roll back to the step that went wrong, explore a revised
branch, then distil the corrections into the weights; compare with baselines by Pass@k.

From Python (see README, "From Python"): `load_spec`, `plan`, `run`, `open_run`, `report`;
a spec that does not validate raises `SpecError`, other mistakes `UserError`. Importing leafe
imports no torch.
"""

__version__ = "0.2.0"

import sys as _sys  # noqa: E402
import types as _types  # noqa: E402


from leafe.api import Run, SpecError, SpecProblem, Stage, load_spec, open_run, plan, report, run  # noqa: E402
from leafe.errors import UserError  # noqa: E402


class _Package(_types.ModuleType):
    """leafe's module type: importing the submodules `leafe.plan` and `leafe.report` (as leafe
    itself does) must not replace the functions `leafe.plan` and `leafe.report`; the modules stay
    importable by name (`from leafe.plan import build_plan`)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("plan", "report") and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

__all__ = ["__version__", "load_spec", "plan", "run", "open_run", "report", "Run", "Stage", "SpecError",
           "SpecProblem", "UserError"]
