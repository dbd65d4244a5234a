"""Run store primitives: atomic writes and append-only JSONL record logs.

A record log survives SIGKILL at any point: appends are flushed and fsynced; a torn last line
(killed mid-write) is cut off when the log is opened again; callers key records so that a
resumed stage neither loses nor duplicates them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from leafe.errors import UserError


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, records: Iterable[dict]) -> None:
        """Atomically replace the whole log (used to drop unfinished episodes on resume)."""
        atomic_write_text(
            self.path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in records)
        )
