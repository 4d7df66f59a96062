"""``reliev3r.durable``: the atomic write and the fsync the snapshots, the output swap, the
streamer's progress file and the evaluator's results share."""

import pytest

from reliev3r import durable


def test_write_text_replaces_the_file_whole_through_its_temporary_file(tmp_path):
    path, tmp = tmp_path / "state.json", tmp_path / "state.json.tmp"
    path.write_text("earlier")
    tmp.write_text("a temporary file left by a killed writer")
    durable.write_text(path, '{"a": 1}', tmp=tmp)
    assert path.read_text() == '{"a": 1}' and not tmp.exists()
    other = tmp_path / "elsewhere"  # a temporary file in another folder of the same file system
    other.mkdir()
    durable.write_text(path, "new", tmp=other / "x.tmp")
    assert path.read_text() == "new" and not any(other.iterdir())


def test_fsync_takes_a_file_or_a_folder_and_names_a_missing_one(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    durable.fsync(tmp_path / "f")
    durable.fsync(tmp_path)
    with pytest.raises(FileNotFoundError):
        durable.fsync(tmp_path / "missing")
