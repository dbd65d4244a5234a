"""The datasets `leafe data` fetches: where each comes from, where it is installed, what uses it.

A dataset is installed into its own folder, ``$LEAFE_DATA/<name>/`` (``$LEAFE_DATA`` defaults
to ``$LEAFE_CACHE/data``; ``$LEAFE_CACHE`` to ``~/.cache/leafe``), which the environment
loaders read by default. A folder is complete when it holds the marker file `MARKER`, written
last: `leafe data get` fills a temporary folder next to the target and renames it into place,
so a folder without the marker was not made by a finished `leafe data get`.

Each source is fetched with the tool its authors use: ALFWorld's release archives from the
URLs of its own `alfworld-download`, WebShop's Google Drive files with `gdown` (as its
`setup.sh`), Hugging Face datasets with `datasets`. ``$LEAFE_DATA_MIRROR`` (or `leafe data get
NAME --from URL`) replaces every source by a plain HTTP folder holding the dataset's `files`
under the same names: ``$LEAFE_DATA_MIRROR/<name>/<file name>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from leafe import paths
from leafe.errors import UserError

#: Written into a dataset's folder last, so its presence means the folder is complete.
MARKER = ".leafe-data.json"

#: ALFWorld 0.4.2's `alfworld-download` (its console script; these constants are not importable
#: from the package): the text games' three archives. It also fetches a Mask R-CNN detector,
#: which only the visual ALFWorld uses, and copies the domain and grammar files the `alfworld`
#: package ships anyway; leafe needs neither. `tests/test_data.py` checks these against the
#: installed script.
ALFWORLD_URLS = {
    "json_2.1.1_json.zip": "https://github.com/alfworld/alfworld/releases/download/0.2.2/json_2.1.1_json.zip",
    "json_2.1.1_pddl.zip": "https://github.com/alfworld/alfworld/releases/download/0.2.2/json_2.1.1_pddl.zip",
    "json_2.1.2_tw-pddl.zip": "https://github.com/alfworld/alfworld/releases/download/0.4.0/json_2.1.2_tw-pddl.zip",
}

#: WebShop's files on Google Drive, as its `setup.sh` fetches them with gdown
#: (github.com/princeton-nlp/WebShop, `./setup.sh -d small|all`).
WEBSHOP_DRIVE_IDS = {
    "items_shuffle_1000.json": "1EgHdxQ_YxqIQlvvq5iKlCrkEKR6-j0Ib",
    "items_ins_v2_1000.json": "1IduG0xl544V_A_jv3tHXC0kyFi7PnyBu",
    "items_shuffle.json": "1A2whVgOO0euk5O13n2iYDM0bQRkkRduB",
    "items_ins_v2.json": "1s2j6NgHljiZzQNL3veZaAiyW_qDEgBNi",
    "items_human_ins.json": "14Kb5SPBk_jfdLZ_CDBNitW98QLDlKR5O",
}


class DataFile(BaseModel):
    """One file of a dataset: fetched from its source, or found under its name in a mirror
    folder or a `--from` folder."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str
    """File name: its name in the installed folder (archives: the archive's name) and in a
    mirror or `--from` folder."""
    url: str | None = None
    """Source `http`: the official URL."""
    gdrive_id: str | None = None
    """Source `gdown`: the Google Drive file id."""
    hub_split: str | None = None
    """Source `hub`: the Hugging Face split exported to this JSONL file."""
    unpack: bool = False
    """An archive (zip or tar) whose members make up the installed folder; not kept."""
    optional: bool = False
    """Installed when the source has it; its absence in a `--from` folder is no error."""
    size: int | None = None
    """Size in bytes, checked when known (null: unknown, only the transfer's own length is
    checked)."""
    sha256: str | None = None
    """SHA-256 of the file, checked when known (null: unknown; the digest of what was
    installed is recorded in the marker)."""
    rows: int | None = None
    """Source `hub`: the split's number of records, checked when exporting from the Hub's
    files (null: not checked)."""
    max_generated_tests: int | None = None
    """Source `hub`, CodeContests: keep at most this many generated tests per problem."""


class Dataset(BaseModel):
    """A dataset `leafe data get` can install."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    name: str
    """The name `leafe data get NAME` takes; also its folder under $LEAFE_DATA."""
    title: str
    """What it is, in a few words."""
    source: Literal["http", "gdown", "hub"]
    """How the official files are fetched: `http` (plain URLs), `gdown` (Google Drive ids)
    or `hub` (a Hugging Face dataset read with `datasets`)."""
    origin: str
    """Where the official files come from, for people (shown by `leafe data list`)."""
    files: list[DataFile]
    """The files of the official source (and of a mirror)."""
    layout: list[str]
    """Entries the installed folder must hold (checked before it is put in place)."""
    hub_id: str | None = None
    """Source `hub`: the Hugging Face dataset id."""
    hub_config: str | None = None
    """Source `hub`: the dataset's configuration (subset), if it has several."""
    used_by: str
    """Which env presets and specs read it (shown by `leafe data list`)."""
    download_size: str | None = None
    """Approximate download size for people, where known (never checked)."""
    also_at: list[str] = Field(default_factory=list)
    """Other folders the loader reads by default when $LEAFE_DATA/<name> is not installed
    (e.g. where the dataset's own downloader writes), if they hold `layout`."""


DATASETS: dict[str, Dataset] = {d.name: d for d in [
    Dataset(
        name="alfworld", title="ALFWorld text games (json_2.1.1: train, valid_seen, valid_unseen)",
        source="http", origin="ALFWorld's GitHub releases (the URLs of alfworld 0.4.2's alfworld-download)",
        files=[DataFile(name=n, url=u, unpack=True) for n, u in ALFWORLD_URLS.items()],
        layout=["json_2.1.1/train", "json_2.1.1/valid_seen", "json_2.1.1/valid_unseen"],
        used_by="env preset alfworld (source: official): specs/alfworld.yaml, alfworld-cluster.yaml, "
                "table3-alfworld.yaml, table4-alfworld.yaml",
        also_at=["~/.cache/alfworld"],
    ),
    Dataset(
        name="webshop", title="WebShop, 1,000 products and the human instructions (subset: small)",
        source="gdown", origin="WebShop's Google Drive files (its setup.sh -d small), with gdown",
        files=[DataFile(name=n, gdrive_id=WEBSHOP_DRIVE_IDS[n])
               for n in ("items_shuffle_1000.json", "items_ins_v2_1000.json", "items_human_ins.json")],
        layout=["items_shuffle_1000.json", "items_ins_v2_1000.json", "items_human_ins.json"],
        used_by="env presets webshop, webshop-verl-agent (subset: small): specs/webshop.yaml, "
                "table3-webshop.yaml, table4-webshop.yaml",
        download_size="about 10 MB",
    ),
    Dataset(
        name="webshop-full", title="WebShop, all 1.18 M products and the human instructions (subset: full)",
        source="gdown", origin="WebShop's Google Drive files (its setup.sh -d all), with gdown",
        files=[DataFile(name=n, gdrive_id=WEBSHOP_DRIVE_IDS[n])
               for n in ("items_shuffle.json", "items_ins_v2.json", "items_human_ins.json")],
        layout=["items_shuffle.json", "items_ins_v2.json", "items_human_ins.json"],
        used_by="env preset webshop with options.subset: full (no spec uses it)",
        download_size="about 5.3 GB",
    ),
    Dataset(
        name="codecontests", title="CodeContests (train 13,328, valid 117, test 165 problems), slim JSONL",
        source="hub", origin="Hugging Face deepmind/code_contests, with datasets (Python 3 solutions "
                             "kept; train: at most 50 generated tests per problem)",
        hub_id="deepmind/code_contests",
        files=[DataFile(name="train.jsonl", hub_split="train", rows=13328, max_generated_tests=50),
               DataFile(name="valid.jsonl", hub_split="valid", rows=117, optional=True),
               DataFile(name="test.jsonl", hub_split="test", rows=165)],
        layout=["train.jsonl", "test.jsonl"],
        used_by="env preset coding-codecontests: specs/codecontests.yaml",
        download_size="about 3.3 GB of Hub parquet (kept: a slim JSONL)",
    ),
    Dataset(
        name="mbpp", title="MBPP (train 374, test 500, validation 90, prompt 10 problems)",
        source="hub", origin="Hugging Face google-research-datasets/mbpp (config full), with datasets",
        hub_id="google-research-datasets/mbpp", hub_config="full",
        files=[DataFile(name="train.jsonl", hub_split="train", rows=374),
               DataFile(name="test.jsonl", hub_split="test", rows=500),
               DataFile(name="validation.jsonl", hub_split="validation", rows=90, optional=True),
               DataFile(name="prompt.jsonl", hub_split="prompt", rows=10, optional=True)],
        layout=["train.jsonl", "test.jsonl"],
        used_by="env preset coding-mbpp (no spec uses it yet)",
        download_size="about 1 MB",
    ),
]}


def human_bytes(n: float) -> str:
    """1,234,567 -> '1.2 MB'."""
    if n < 1000:
        return f"{n:,.0f} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:,.1f} {unit}"


def data_root() -> Path:
    """``$LEAFE_DATA`` (default ``$LEAFE_CACHE/data``)."""
    root = os.environ.get("LEAFE_DATA")
    return Path(root).expanduser() if root else paths.cache_root() / "data"


def dataset(name: str) -> Dataset:
    """The registry entry of `name`, or a UserError naming the known ones."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; leafe can fetch: {', '.join(DATASETS)} "
                        "(see `leafe data list`)")
    return DATASETS[name]


def dataset_dir(name: str) -> Path:
    """``$LEAFE_DATA/<name>``: where `leafe data get NAME` installs it."""
    return data_root() / dataset(name).name


def installed(name: str) -> bool:
    """Whether ``$LEAFE_DATA/<name>`` holds a finished install (its marker)."""
    return (dataset_dir(name) / MARKER).is_file()


def has_layout(name: str, folder: Path) -> bool:
    """Whether `folder` holds every entry of the dataset's installed layout."""
    return all((folder / entry).exists() for entry in dataset(name).layout)


def locate(name: str) -> Path:
    """Where the loaders read `name` by default: ``$LEAFE_DATA/<name>`` when installed there;
    else the first of the dataset's `also_at` folders that holds its layout; else
    ``$LEAFE_DATA/<name>`` (where `leafe data get NAME` would put it)."""
    if installed(name):
        return dataset_dir(name)
    for other in dataset(name).also_at:
        folder = Path(os.path.expandvars(other)).expanduser()
        if has_layout(name, folder):
            return folder
    return dataset_dir(name)


def missing(name: str) -> str | None:
    """None when the loaders find `name` at its default place (`locate`), else one line: what
    is missing, where, and the command that installs it."""
    folder = locate(name)
    if installed(name) or folder != dataset_dir(name):  # also_at: complete by its layout
        return None
    also = "".join(f" or {p}" for p in dataset(name).also_at)
    return (f"{name} data not found in {folder}{also}: run `leafe data get {name}` "
            f"(without internet: `leafe data get {name} --from PATH_OR_URL`)")


def read_marker(name: str) -> dict | None:
    """The marker of an installed dataset (what was installed, from where, sizes)."""
    try:
        return json.loads((dataset_dir(name) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
