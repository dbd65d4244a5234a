"""Run store primitives: atomic writes and append-only JSONL record logs.

A record log survives SIGKILL at any point: appends are flushed and fsynced; a torn last line
(killed mid-write) is cut off when the log is opened again; callers key records so that a
resumed stage neither loses nor duplicates them.

Files and folders leafe creates get the modes of plain `open`/`mkdir` under the user's umask
(typically 0644 and 0755; 0664 and 0775 under umask 002), so a colleague can read a shared run
or cache: `tempfile.mkstemp`/`mkdtemp`, which always give 0600/0700, are not used for anything
that is renamed into place, and what libraries write owner-only (safetensors' weights) is
widened to the umask's modes once a stage or a model cache entry is complete (`relax_modes`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Iterable, Iterator

from leafe.errors import UserError


def _umask_now() -> int:
    """The process's umask, read without changing it (`/proc/self/status`; setting it to read
    it back would race with threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


_UMASK_AT_IMPORT = os.umask(0o022)  # no /proc: the umask at import, read (and restored) once
os.umask(_UMASK_AT_IMPORT)


def relax_modes(root: Path) -> None:
    """Give what a library wrote owner-only under `root` (files 0600 or 0700, folders 0700:
    safetensors saves weights through a 0600 temporary file) the modes `open` and `mkdir`
    give under the umask, so a colleague can read a shared run or model cache. Other modes
    are left alone; under umask 077 nothing changes."""
    umask = _umask_now()
    for p in [root, *root.rglob("*")]:
        try:
            st = p.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                want = 0o777 & ~umask if mode == 0o700 else mode
            elif stat.S_ISREG(st.st_mode) and mode in (0o600, 0o700):
                want = (0o777 if mode == 0o700 else 0o666) & ~umask
            else:
                continue
            if want != mode:
                os.chmod(p, want)
        except OSError:  # gone meanwhile, or not ours: its mode is not worth failing a stage
            continue


def _temp_name(folder: Path, prefix: str, suffix: str) -> Path:
    return folder / f"{prefix}{secrets.token_hex(4)}{suffix}"


def make_temp_dir(folder: Path, prefix: str, suffix: str = "") -> Path:
    """A new, uniquely named folder in `folder` (mkdtemp's name pattern) with the mode a plain
    `mkdir` gives under the umask; mkdtemp's 0700 would stay on a folder renamed into place
    (a model cache, an installed dataset) and lock out every other user."""
    for _ in range(100):
        tmp = _temp_name(folder, prefix, suffix)
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no unused temporary folder name in {folder}")


def _open_temp(path: Path) -> tuple[int, Path]:
    """A new temporary file beside `path`, opened for writing with mode 0666 less the umask
    (mkstemp's 0600 would be renamed onto `path`)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = _temp_name(path.parent, f".{path.name}.", ".tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:  # name the file meant, not the temporary one (EACCES, ENOSPC, EROFS)
            raise OSError(e.errno, e.strerror, str(path)) from None
    raise FileExistsError(f"no unused temporary file name beside {path}")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _reraise_named(e, path)
        raise


def _reraise_named(e: BaseException, path: Path) -> None:
    """An OSError from a write (a full disk: ENOSPC) carries no file name: raise it again naming
    `path`, so the message says where."""
    if isinstance(e, OSError) and e.errno and e.filename is None:
        raise OSError(e.errno, e.strerror, str(path)) from None


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def atomic_replace_dir(tmp_dir: Path, final: Path) -> None:
    """Move a fully written directory into place (replacing an older one)."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
        os.replace(tmp_dir, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final)


class CorruptRecordError(UserError):
    """A record log holds a line that is not a JSON object."""


def parse_record(path: Path, lineno: int, line: str | bytes) -> dict:
    """One line of a record log as a dict, or a `CorruptRecordError` saying where and what to do."""
    try:
        record = json.loads(line)
        problem = None if isinstance(record, dict) else f"a JSON {type(record).__name__}, not a record object"
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        problem = f"not valid JSON: {e}"
    if problem is None:
        return record
    raise CorruptRecordError(
        f"{path} line {lineno}: {problem}; the file was damaged after leafe wrote it (leafe writes whole "
        f"records). Delete the stage directory {path.parent} to run that stage again, or restore the file "
        "from a copy")


def iter_records(path: Path, complete_only: bool = False) -> Iterator[dict]:
    """The records of a JSONL file, blank lines skipped; `complete_only`: a last line without
    its newline (a write in progress) is skipped, not parsed."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if complete_only and not line.endswith(b"\n"):
                continue
            if line.strip():
                yield parse_record(path, lineno, line)


class RecordLog:
    """An append-only JSONL file."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        """Cut a torn trailing line left by a kill mid-write."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def __iter__(self) -> Iterator[dict]:
        """The records in order; a line that is not a JSON object is a `CorruptRecordError`
        naming the file and line (leafe writes whole lines: such a line was damaged outside
        it)."""
        if not self.path.exists():
            return
        yield from iter_records(self.path)

    def read(self) -> list[dict]:
        return list(self)

    def append(self, records: Iterable[dict]) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
        if not lines:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:  # a torn last line is cut off when the log is opened again
            _reraise_named(e, self.path)
            raise

    def rewrite(self, records: Iterable[dict]) -> None:
        """Atomically replace the whole log (used to drop unfinished episodes on resume)."""
        atomic_write_text(
            self.path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
        )
