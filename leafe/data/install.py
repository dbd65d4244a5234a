"""`leafe data get`: fetch a dataset, check it, and put it in place atomically.

The files are fetched into ``$LEAFE_DATA/.downloads/<name>/`` (kept until the install succeeds,
so an interrupted transfer resumes), then unpacked or copied into a temporary folder next to
the target (``$LEAFE_DATA/.<name>.<random>.tmp``), checked (layout, file sizes and checksums
where known, every record readable), given its marker last, and renamed to
``$LEAFE_DATA/<name>``. A folder at the target is therefore either absent or complete; an
old install replaced with `--force` is renamed away first and deleted after. A file that
fails its checks (wrong size or checksum, a corrupt archive) is deleted, so the next attempt
fetches it afresh. One `leafe data get` per dataset at a time (a lock).

Sources, in order: `--from` (a local folder or archive, a URL of an archive, or a mirror
URL: a folder served over HTTP with the dataset's files), else ``$LEAFE_DATA_MIRROR``
(``<mirror>/<name>/<file>``), else the official source (`registry.Dataset.source`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tarfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

import leafe
from leafe.data import fetch
from leafe.data.fetch import DataError
from leafe.data.registry import MARKER, Dataset, DataFile, data_root, dataset, dataset_dir, human_bytes, installed
from leafe.errors import UserError
from leafe.store import make_temp_dir

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def _is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_url(source: str) -> bool:
    return urlsplit(source).scheme in ("http", "https")


# -- checks -------------------------------------------------------------------------------------
def _check_alfworld(folder: Path) -> str:
    counts = {}
    for split in ("train", "valid_seen", "valid_unseen"):
        n = 0
        for _, _, files in os.walk(folder / "json_2.1.1" / split):
            n += "game.tw-pddl" in files
        if not n:
            raise DataError(f"alfworld: no game.tw-pddl under json_2.1.1/{split}/ of what was fetched "
                            "(the archives are incomplete or not ALFWorld's)")
        counts[split] = n
    return ", ".join(f"{n:,} {split} games" for split, n in counts.items())


def _check_webshop(folder: Path, files: list[str]) -> str:
    kinds = {"items_shuffle": list, "items_ins_v2": dict, "items_human_ins": dict}
    out = []
    for name in files:
        path = folder / name
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"webshop: {name} is not readable JSON ({str(e)[:120]}): a corrupt or "
                            "incomplete file (Google Drive sometimes serves a web page instead)") from None
        kind = kinds[name.split(".")[0].replace("_1000", "")]
        if not isinstance(obj, kind) or not obj:
            raise DataError(f"webshop: {name} holds a {type(obj).__name__}, not WebShop's non-empty "
                            f"{kind.__name__}")
        out.append(f"{len(obj):,} entries in {name}")
    return ", ".join(out)


def _check_coding(dataset_name: str) -> Callable[[Path], str]:
    def check(folder: Path) -> str:
        from leafe.envs.coding.datasets import JsonlSource

        out = []
        for f in dataset(dataset_name).files:
            path = folder / f.name
            if not path.is_file():
                continue
            try:
                n = len(JsonlSource(dataset_name, path).ids)
            except UserError as e:
                raise DataError(f"{dataset_name}: {f.name} is not a {dataset_name} JSONL file: {e}") from None
            if not n:
                raise DataError(f"{dataset_name}: {f.name} holds no problems")
            out.append(f"{n:,} {f.name.removesuffix('.jsonl')}")
        return ", ".join(out) + " problems"
    return check


#: Per dataset: checks an unpacked folder (raises DataError) and says what it holds.
CHECKS: dict[str, Callable[[Path], str]] = {
    "alfworld": _check_alfworld,
    "webshop": lambda d: _check_webshop(d, dataset("webshop").layout),
    "webshop-full": lambda d: _check_webshop(d, dataset("webshop-full").layout),
    "codecontests": _check_coding("codecontests"),
    "mbpp": _check_coding("mbpp"),
}


def _verify(f: DataFile, path: Path, fetched: bool = True) -> dict:
    """Check a file's size and checksum where known; its record for the marker. A fetched
    file that fails is deleted (with its partial transfer), so the next attempt refetches it;
    a user's own file (`--from`) is left alone."""
    size = path.stat().st_size
    again = ("deleted it, run the same command again to fetch it afresh" if fetched
             else "use another copy")
    if f.size is not None and size != f.size:
        if fetched:
            fetch.discard(path)
        raise DataError(f"{path}: {size:,} bytes where {f.size:,} were expected; {again}")
    digest = fetch.sha256_of(path)
    if f.sha256 is not None and digest != f.sha256.lower():
        if fetched:
            fetch.discard(path)
        raise DataError(f"{path}: SHA-256 {digest} where {f.sha256} was expected (a corrupt or different "
                        f"file); {again}")
    return {"name": f.name, "bytes": size, "sha256": digest}


# -- unpacking ----------------------------------------------------------------------------------
def _safe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts


def unpack(archive: Path, into: Path, label: str | None = None) -> None:
    """Unpack a zip or tar archive into `into`; a corrupt archive (or one with members outside
    its folder) is a DataError."""
    label = label or archive.name
    lower = archive.name.lower()
    try:
        if lower.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                bad = z.testzip()
                if bad is not None:
                    raise DataError(f"{label}: corrupt archive (member {bad} fails its CRC check)")
                unsafe = [m for m in z.namelist() if not _safe_member(m)]
                if unsafe:
                    raise DataError(f"{label}: refusing an archive with members outside its folder ({unsafe[0]})")
                z.extractall(into)
        else:
            with tarfile.open(archive) as t:
                members = t.getmembers()
                unsafe = [m.name for m in members if not _safe_member(m.name) or m.issym() or m.islnk()
                          or not (m.isfile() or m.isdir())]
                if unsafe:
                    raise DataError(f"{label}: refusing an archive with links, devices or members outside its "
                                    f"folder ({unsafe[0]})")
                if hasattr(tarfile, "data_filter"):
                    t.extractall(into, filter="data")
                else:  # Python < 3.10.12: the members were checked above
                    t.extractall(into)
    except DataError:
        raise
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno is not None and e.filename:  # disk full, permissions
            raise DataError(f"{label}: cannot unpack into {into}: {e.strerror}") from None
        raise DataError(f"{label}: corrupt archive ({type(e).__name__}: {str(e)[:160]})") from None


def _descend(folder: Path, wanted: list[str]) -> Path:
    """`folder`, or the single subfolder an archive wrapped the wanted entries in."""
    for _ in range(3):
        if any((folder / w).exists() for w in wanted):
            return folder
        entries = [p for p in folder.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) != 1 or not entries[0].is_dir():
            return folder
        folder = entries[0]
    return folder


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


# -- sources ------------------------------------------------------------------------------------
class _Install:
    """One `leafe data get NAME`: its folders, console and progress."""

    def __init__(self, d: Dataset, root: Path, console: Any):
        self.d = d
        self.root = root
        self.console = console
        self.downloads = root / ".downloads" / d.name
        self.staging = make_temp_dir(root, f".{d.name}.", ".tmp")  # umask modes, not 0700
        self.records: list[dict] = []

    def fetch_url(self, f: DataFile, url: str, progress: Any) -> Path:
        self.downloads.mkdir(parents=True, exist_ok=True)
        path = fetch.http_download(url, self.downloads / f.name, progress, name=self.d.name, size=f.size)
        self.records.append({**_verify(f, path), "from": url})
        return path

    def place(self, f: DataFile, path: Path) -> None:
        """Put a fetched (verified) file into the staging folder."""
        if f.unpack:
            try:
                unpack(path, self.staging, f.name)
            except DataError:
                fetch.discard(path)
                raise
        else:
            shutil.copy2(path, self.staging / f.name)

    # official sources
    def from_official(self) -> str:
        d = self.d
        if d.source == "hub":
            from leafe.data.hub import export_from_hub

            self.records += export_from_hub(d, self.staging, self.console)
            return f"Hugging Face {d.hub_id}"
        with fetch.progress_bar(self.console) as progress:
            for f in d.files:
                if d.source == "http":
                    assert f.url is not None
                    self.place(f, self.fetch_url(f, f.url, progress))
                else:
                    assert f.gdrive_id is not None
                    self.downloads.mkdir(parents=True, exist_ok=True)
                    path = fetch.gdrive_download(f.gdrive_id, self.downloads / f.name, progress, name=d.name)
                    self.records.append({**_verify(f, path), "from": fetch.GDRIVE_URL.format(id=f.gdrive_id)})
                    self.place(f, path)
        return d.origin

    def from_mirror(self, base: str) -> str:
        """A folder served over HTTP holding the dataset's files under their names."""
        base = base.rstrip("/")
        with fetch.progress_bar(self.console) as progress:
            for f in self.d.files:
                try:
                    path = self.fetch_url(f, f"{base}/{f.name}", progress)
                except DataError as e:
                    if f.optional and "HTTP 404" in str(e):
                        continue
                    raise
                self.place(f, path)
        return f"mirror {base}"

    def from_archive_url(self, url: str) -> str:
        name = PurePosixPath(urlsplit(url).path).name
        with fetch.progress_bar(self.console) as progress:
            self.downloads.mkdir(parents=True, exist_ok=True)
            path = fetch.http_download(url, self.downloads / name, progress, name=self.d.name)
        self.records.append({"name": name, "bytes": path.stat().st_size, "sha256": fetch.sha256_of(path),
                             "from": url})
        self._from_archive(path)
        return url

    def _from_archive(self, archive: Path) -> None:
        unpacked = make_temp_dir(self.root, f".{self.d.name}.from-", ".tmp")
        try:
            unpack(archive, unpacked)
            self.from_folder(unpacked, label=str(archive))
        finally:
            shutil.rmtree(unpacked, ignore_errors=True)

    def from_local(self, source: Path) -> str:
        if not source.exists():
            raise UserError(f"--from {source}: no such file or folder")
        if source.is_dir():
            self.from_folder(source, label=str(source))
        elif _is_archive(source.name):
            self._from_archive(source)
        else:
            raise UserError(f"--from {source}: give a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)}) "
                            f"holding {self.d.name}'s files: {', '.join(f.name for f in self.d.files)}")
        return str(source.resolve())

    def from_folder(self, folder: Path, label: str) -> None:
        """A folder with the dataset's files (archives unpacked), or its installed layout, or
        (Hugging Face datasets) the dataset as the Hub stores it."""
        d = self.d
        names = [f.name for f in d.files]
        folder = _descend(folder, names + d.layout)
        required = [f for f in d.files if not f.optional]
        if all((folder / f.name).is_file() for f in required):
            for f in d.files:
                if (folder / f.name).is_file():
                    self.records.append({**_verify(f, folder / f.name, fetched=False),
                                         "from": str(folder / f.name)})
                    if f.unpack:
                        unpack(folder / f.name, self.staging, f.name)
                    else:
                        shutil.copy2(folder / f.name, self.staging / f.name)
            return
        if all((folder / entry).exists() for entry in d.layout):
            for entry in d.layout:
                _copy(folder / entry, self.staging / entry)
            for f in d.files:  # optional files of an installed layout
                if not f.unpack and (folder / f.name).is_file() and not (self.staging / f.name).exists():
                    shutil.copy2(folder / f.name, self.staging / f.name)
            self.records.append({"name": label, "layout": d.layout})
            return
        if d.source == "hub":
            from leafe.data.hub import export_from_folder

            found = export_from_folder(d, folder, self.staging, self.console)
            if found is not None:
                self.records += found
                return
        want = ", ".join(f.name for f in required)
        layout = ", ".join(d.layout)
        hub = " or the Hub's files of the dataset (parquet, or a datasets.save_to_disk folder)" if d.source == "hub" else ""
        raise UserError(f"--from {label}: found neither {d.name}'s files ({want}) nor an installed {d.name} "
                        f"folder ({layout}){hub}")


# -- the install ------------------------------------------------------------------------------
@contextmanager
def _lock(root: Path, name: str) -> Iterator[None]:
    f = open(root / f".{name}.lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise UserError(f"another `leafe data get {name}` is running (lock {root / f'.{name}.lock'}); "
                        "wait for it") from None
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _clean_leftovers(root: Path, name: str) -> None:
    """Temporary folders of an earlier `get` that was killed (never complete-looking)."""
    for p in root.glob(f".{name}.*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(f".{name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def get(name: str, source: str | None = None, force: bool = False, console: Any = None) -> Path:
    """Install dataset `name` into ``$LEAFE_DATA/<name>`` (see the module docstring); returns
    the folder. Already installed: returns it untouched unless `force`."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console(stderr=True)
    d = dataset(name)
    target = dataset_dir(name)
    if installed(name) and not force:
        console.print(f"{name} is already installed in {escape(str(target))} (--force fetches it again)",
                      highlight=False)
        return target
    if target.exists() and not force:
        raise UserError(f"{target} exists but is not a finished `leafe data get` (no {MARKER}); move it away, "
                        f"or replace it: `leafe data get {name} --force`")
    root = data_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the data folder {root} ($LEAFE_DATA): {e.strerror or e}") from None
    with _lock(root, name):
        _clean_leftovers(root, name)
        job = _Install(d, root, console)
        try:
            mirror = os.environ.get("LEAFE_DATA_MIRROR")
            if source is not None and _is_url(source):
                origin = job.from_archive_url(source) if _is_archive(source) else job.from_mirror(source)
            elif source is not None:
                origin = job.from_local(Path(source).expanduser())
            elif mirror:
                origin = job.from_mirror(f"{mirror.rstrip('/')}/{name}")
            else:
                origin = job.from_official()
            summary = CHECKS[name](job.staging)
            marker = {"name": name, "title": d.title, "source": origin, "files": job.records,
                      "contents": summary, "bytes": _size_of(job.staging),
                      "installed": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "leafe": leafe.__version__}
            tmp = job.staging / (MARKER + ".tmp")
            tmp.write_text(json.dumps(marker, indent=1), encoding="utf-8")
            os.replace(tmp, job.staging / MARKER)  # last: the folder is complete
            old = None
            if target.exists():
                old = root / f".{name}.old-{os.getpid()}"
                os.replace(target, old)
            os.replace(job.staging, target)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(job.staging, ignore_errors=True)
            raise
        shutil.rmtree(job.downloads, ignore_errors=True)
    console.print(f"[green]installed[/green] {name}: {escape(summary)} ({human_bytes(marker['bytes'])}) "
                  f"from {escape(origin)}", highlight=False)
    return target
