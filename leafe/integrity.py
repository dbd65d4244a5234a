"""What a finished stage wrote, and whether it is still there: the DONE marker.

When a stage finishes, the runner writes `<stage dir>/DONE` (JSON, `DoneMarker`): per file
the stage wrote at its top level (records, metrics, logs; not dot-files) its size, sha256 and,
for a `.jsonl` file, its record count; per file of its `checkpoint/` its size and sha256. Every
later use of the stage (`leafe run`, `leafe report`, `leafe plan`) checks the directory against
it (`check_stage`; sizes first, then the sha256, computed once per file version and process;
checkpoint files by size only, since hashing weights is slow: a stage that starts from the
checkpoint checks their sha256 first, `verify_checkpoint`):

- `done`: everything is as written (or the marker predates these fields: unverified, used
  as before, except that a `.jsonl` file with a torn last line is damaged).
- `incomplete`: a file the stage wrote is missing (e.g. `metrics.json` deleted). The stage is
  not done: `leafe plan` says which file, `leafe run` removes the marker and runs the stage
  again, resuming from what it kept (as after a kill just before it finished), and `leafe
  report` stops (exit 2) until that re-run, unless only `checkpoint/` files are gone (the
  report reads records, never models).
- `damaged`: a file is there but not what the stage wrote (a torn last line, an edit, a
  truncated checkpoint). Nothing uses it: `leafe run`, `leafe report` and `leafe plan` stop
  with exit 2, naming the file and saying to delete the stage directory, which re-runs the
  stage (`leafe report` looks past a changed `checkpoint/` file, as past a missing one).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from leafe.errors import UserError
from leafe.store import atomic_write_text

DONE = "DONE"
CHECKPOINT = "checkpoint"


class FileRecord(BaseModel):
    """One file a finished stage wrote."""

    model_config = ConfigDict(extra="ignore")

    bytes: int
    """Its size."""
    sha256: str | None = None
    """Its sha256 (`check_stage` compares it for top-level files; checkpoint files only when a
    stage starts from them, `verify_checkpoint`)."""
    records: int | None = None
    """Lines of a `.jsonl` record log."""


class DoneMarker(BaseModel):
    """`<stage dir>/DONE`: the stage finished, and what it wrote."""

    model_config = ConfigDict(extra="ignore")

    done: Literal[1] = 1
    """The marker's format version."""
    seconds: float | None = None
    """Wall time of the run that finished the stage."""
    files: dict[str, FileRecord] | None = None
    """Per path relative to the stage directory, what was written; None: a marker written
    before leafe recorded files (unverified)."""


@dataclass
class StageCheck:
    """A stage directory against its DONE marker."""

    status: Literal["todo", "partial", "done", "incomplete", "damaged"]
    missing: list[str] = field(default_factory=list)
    """Files the stage wrote that are gone."""
    changed: dict[str, str] = field(default_factory=dict)
    """Per file that differs, how (`records.jsonl has 11 whole records ...; the stage wrote 12`)."""
    verified: bool = True
    """False for a marker without `files` (written by an older leafe)."""

    def reason(self) -> str:
        """What is wrong, for a table cell or a message ('' when nothing is)."""
        if self.changed:
            return "; ".join(self.changed.values())
        if self.missing:
            shown = self.missing[:3] + ([f"{len(self.missing) - 3} more"] if len(self.missing) > 3 else [])
            return ", ".join(shown) + " missing"
        return ""

    def records_only(self) -> "StageCheck":
        """The check without the stage's `checkpoint/` (for readers of records, e.g. the
        report, which never loads a model)."""
        if self.status not in ("incomplete", "damaged"):
            return self
        missing = [m for m in self.missing if not m.startswith(f"{CHECKPOINT}/")]
        changed = {k: v for k, v in self.changed.items() if not k.startswith(f"{CHECKPOINT}/")}
        status = "damaged" if changed else "incomplete" if missing else "done"
        return StageCheck(status, missing, changed, self.verified)


#: sha256 per (path, inode, size, mtime): a file version is hashed once per process
_DIGESTS: dict[tuple, str] = {}


def _sha256(path: Path, st: os.stat_result) -> str:
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def _count_lines(path: Path) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def _torn(path: Path, size: int) -> bool:
    """A non-empty file whose last byte is not a newline (killed mid-line, or cut)."""
    if size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(size - 1)
        return f.read(1) != b"\n"


def written_files(stage_dir: Path) -> dict[str, FileRecord]:
    """What a finished stage wrote: its top-level files (not dot-files, not DONE) with size,
    sha256 and record count, and its `checkpoint/` files with size and sha256."""
    out: dict[str, FileRecord] = {}
    for p in sorted(stage_dir.iterdir()):
        if p.name.startswith(".") or p.name == DONE or not p.is_file():
            continue
        st = p.stat()
        out[p.name] = FileRecord(bytes=st.st_size, sha256=_sha256(p, st),
                                 records=_count_lines(p) if p.suffix == ".jsonl" else None)
    ck = stage_dir / CHECKPOINT
    if ck.is_dir():
        for p in sorted(ck.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                st = p.stat()
                out[p.relative_to(stage_dir).as_posix()] = FileRecord(bytes=st.st_size, sha256=_sha256(p, st))
    return out


def write_done(stage_dir: Path, seconds: float) -> DoneMarker:
    """Mark a stage finished, recording what it wrote (`written_files`)."""
    marker = DoneMarker(seconds=round(seconds, 1), files=written_files(stage_dir))
    atomic_write_text(stage_dir / DONE, marker.model_dump_json(indent=2, exclude_none=True) + "\n")
    return marker


def read_done(stage_dir: Path) -> DoneMarker | None:
    """The stage's DONE marker; None when there is none. A marker that is not this JSON (an
    older leafe wrote `12.3 s`, tests write an empty file) is an unverified one."""
    path = stage_dir / DONE
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    try:
        return DoneMarker.model_validate(json.loads(text))
    except (ValueError, ValidationError):
        return DoneMarker()


def check_stage(stage_dir: Path) -> StageCheck:
    """The stage's status against its DONE marker (see the module docstring): `todo` (no
    directory or an empty one), `partial` (artifacts, no marker), `done`, `incomplete` or
    `damaged`."""
    marker = read_done(stage_dir)
    if marker is None:
        has_any = stage_dir.is_dir() and any(stage_dir.iterdir())
        return StageCheck("partial" if has_any else "todo")
    if marker.files is None:  # an older marker: no record of what was written
        torn = {p.name: f"{p.name} ends in a torn line (a record cut off)"
                for p in sorted(stage_dir.glob("*.jsonl")) if _torn(p, p.stat().st_size)}
        return StageCheck("damaged" if torn else "done", changed=torn, verified=False)
    missing: list[str] = []
    changed: dict[str, str] = {}
    for name, rec in marker.files.items():
        path = stage_dir / name
        try:
            st = path.stat()
        except FileNotFoundError:
            missing.append(name)
            continue
        if st.st_size != rec.bytes:
            changed[name] = _difference(name, path, rec, st)
        elif rec.sha256 is not None and not name.startswith(CHECKPOINT + "/") and _sha256(path, st) != rec.sha256:
            changed[name] = (f"{name} has other content (sha256 {_sha256(path, st)[:12]}…; the stage wrote "
                             f"{rec.sha256[:12]}…)")
    if changed:
        return StageCheck("damaged", missing, changed)
    if missing:
        return StageCheck("incomplete", missing)
    return StageCheck("done")


def verify_checkpoint(stage_id: str, stage_dir: Path) -> None:
    """Before a stage starts from `stage_dir`'s checkpoint: its files against the sha256 the
    finished stage recorded (a same-size change, e.g. a bad copy, passes `check_stage`); a
    difference is `damaged_error`. Markers without checkpoint digests are taken as they are."""
    marker = read_done(stage_dir)
    if marker is None or not marker.files:
        return
    changed = {}
    for name, rec in marker.files.items():
        if not name.startswith(CHECKPOINT + "/") or rec.sha256 is None:
            continue
        path = stage_dir / name
        try:
            st = path.stat()
        except FileNotFoundError:
            continue  # missing: check_stage makes the stage incomplete
        if st.st_size == rec.bytes and _sha256(path, st) != rec.sha256:
            changed[name] = (f"{name} has other content (sha256 {_sha256(path, st)[:12]}…; the stage wrote "
                             f"{rec.sha256[:12]}…)")
    if changed:
        raise damaged_error(stage_id, stage_dir, StageCheck("damaged", changed=changed))


def _difference(name: str, path: Path, rec: FileRecord, st: os.stat_result) -> str:
    """A file whose size changed, in words (a record log: its records)."""
    if rec.records is None:
        return f"{name} has {st.st_size} bytes; the stage wrote {rec.bytes}"
    torn = " and a torn last line" if _torn(path, st.st_size) else ""
    return (f"{name} has {_count_lines(path)} whole records{torn} ({st.st_size} bytes); the stage wrote "
            f"{rec.records} ({rec.bytes} bytes)")


def damaged_error(stage_id: str, stage_dir: Path, check: StageCheck) -> UserError:
    """The message for a damaged finished stage: what changed, where, how to fix it."""
    return UserError(f"{stage_dir}: {check.reason()}: not what the finished stage {stage_id} wrote, so "
                     f"leafe will not use it. Delete the stage directory to run the stage again "
                     f"(`rm -r {stage_dir}`), or restore the file from a copy")


def incomplete_error(stage_id: str, stage_dir: Path, check: StageCheck) -> UserError:
    """The message for a finished stage that lost a file it wrote (for commands that do not
    run stages, e.g. `leafe report`)."""
    return UserError(f"{stage_dir}: {', '.join(check.missing)} missing: the finished stage {stage_id} wrote "
                     "it, so its results are incomplete. `leafe run` with the same spec runs the stage again "
                     "(resuming from what it kept); then report")
