"""Record logs survive torn writes; atomic writes never leave partial files."""

import json
import os

from leafe.store import RecordLog, atomic_write_json, atomic_write_text


def test_append_read_and_rewrite(tmp_path):
    log = RecordLog(tmp_path / "r.jsonl")
    log.append([{"a": 1}, {"a": 2}])
    log.append([{"a": 3}])
    assert [r["a"] for r in log] == [1, 2, 3]
    log.rewrite([{"a": 9}])
    assert log.read() == [{"a": 9}]


def test_torn_last_line_is_cut_on_open(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps({"a": 1}) + "\n" + '{"a": 2, "b"')
    log = RecordLog(p)
    assert log.read() == [{"a": 1}]
    log.append([{"a": 3}])
    assert [r["a"] for r in RecordLog(p)] == [1, 3]


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"x": 1})
    atomic_write_text(tmp_path / "m.json", "replaced")
    assert (tmp_path / "m.json").read_text() == "replaced"
    assert os.listdir(tmp_path) == ["m.json"]
