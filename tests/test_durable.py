"""``reliev3r.durable``: the atomic write and the fsync the snapshots, the output swap, the
streamer's progress file, the evaluator's results and the studies' datasets share."""

import pytest

from reliev3r import durable


def test_write_replaces_the_file_whole_through_its_temporary_file(tmp_path):
    path, tmp = tmp_path / "state.json", tmp_path / "state.json.tmp"
    path.write_text("earlier")
    tmp.write_text("a temporary file left by a killed writer")
    durable.write(path, '{"a": 1}', tmp=tmp)
    assert path.read_text() == '{"a": 1}' and not tmp.exists()
    other = tmp_path / "elsewhere"  # a temporary file in another folder of the same file system
    other.mkdir()
    durable.write(path, "new", tmp=other / "x.tmp")
    assert path.read_text() == "new" and not any(other.iterdir())


def test_fsync_takes_a_file_or_a_folder_and_names_a_missing_one(tmp_path):
    (tmp_path / "f").write_bytes(b"x")
    durable.fsync(tmp_path / "f")
    durable.fsync(tmp_path)
    with pytest.raises(FileNotFoundError):
        durable.fsync(tmp_path / "missing")


def test_write_fsyncs_the_folder_after_the_rename(tmp_path, folder_fsyncs):
    """The rename survives a power loss only once the folder that names the file is flushed:
    without it the earlier file may stand again after one (a re-sent window, a re-scored
    snapshot), although the new one's bytes were fsynced."""
    path = tmp_path / "state.json"
    path.write_text("earlier")
    flushed = folder_fsyncs(tmp_path, lambda: path.read_text())
    durable.write(path, "new", tmp=tmp_path / "state.json.tmp")
    assert flushed and flushed[-1] == "new"  # flushed after the rename, not only before it



def test_write_takes_bytes_or_text_and_writes_bytes_as_they_are(tmp_path, folder_fsyncs):
    """The studies' ``.npz`` files (a dataset's cache, a fresh window) go through the one writer
    too: bytes, or a buffer such as ``io.BytesIO.getbuffer()``, written unchanged."""
    path, tmp = tmp_path / "w.npz", tmp_path / ".w.tmp"
    data = bytes(range(256)) * 3 + b"\r\n\n"
    flushed = folder_fsyncs(tmp_path, path.exists)
    durable.write(path, data, tmp=tmp)
    assert path.read_bytes() == data and not tmp.exists() and flushed[-1] is True
    durable.write(path, memoryview(b"a buffer"), tmp=tmp)
    assert path.read_bytes() == b"a buffer"
    durable.write(path, "tëxt", tmp=tmp)
    assert path.read_bytes() == "tëxt".encode()  # text as UTF-8, whatever the locale
