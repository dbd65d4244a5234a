"""Storage failures in words: a full disk (ENOSPC, EDQUOT, torch's `unexpected pos` while
saving) or a place that cannot be written (EACCES, EPERM from an immutable flag, EROFS). Every
command says what, where and how to go on (exit 2), never a traceback."""

from __future__ import annotations

import errno
import os
import re
import shutil

#: errno values of a full disk or an exhausted quota
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
#: errno values of a place the user may not write (mode bits, an immutable flag, a read-only mount)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
#: torch's zip writer when a write comes up short (a full disk): `unexpected pos 123 vs 456`
_TORCH_SHORT_WRITE = re.compile(r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing|file write failed")


def storage_problem(e: BaseException, where: str | os.PathLike | None = None) -> tuple[str, str] | None:
    """A full disk or a place that cannot be written, in words: `("full", "the disk holding X is
    full (...)")` or `("denied", "X: Permission denied")`; None for any other error. `where`: the
    folder being written when the error names no file (torch's `unexpected pos`)."""
    path = getattr(e, "filename", None) or where
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        what = "quota exceeded" if e.errno == errno.EDQUOT else "no space left on device"
        return "full", f"the disk holding {path or 'the run'} is full ({what}{_free(path)})"
    if isinstance(e, RuntimeError) and _TORCH_SHORT_WRITE.search(str(e)):
        first = str(e).strip().splitlines()[0][:200]
        return "full", (f"the disk holding {path or 'the run'} is most likely full (torch could not finish writing "
                        f"a file there: {first}{_free(path)})")
    if isinstance(e, OSError) and e.errno in NOT_WRITABLE:
        flag = " (an immutable flag? see `lsattr -d`)" if e.errno == errno.EPERM else ""
        return "denied", f"{path}: {e.strerror}{flag}"
    return None


def _free(path: str | os.PathLike | None) -> str:
    """`; 12.0 KiB free there` for the nearest existing folder of `path`; '' when unknown."""
    if path is None:
        return ""
    p = os.path.abspath(path)
    while p and not os.path.exists(p):
        parent = os.path.dirname(p)
        if parent == p:
            return ""
        p = parent
    try:
        free = float(shutil.disk_usage(p).free)
    except OSError:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"; {free:.0f} {unit} free there" if unit == "B" else f"; {free:.1f} {unit} free there"
        free /= 1024
    return ""


def os_error_message(e: BaseException, doing: str, fix: str, again: str,
                     where: str | os.PathLike | None = None) -> str:
    """`<doing>: <what storage_problem says>; <fix>` for a place that cannot be written, `...;
    free space there, then <again>` for a full disk; any other error as `<doing>: <error>; <fix>`."""
    found = storage_problem(e, where)
    if found is None:
        return f"{doing}: {e}; {fix}"
    kind, what = found
    return f"{doing}: {what}; " + (f"free space there, then {again}" if kind == "full" else fix)
