"""``reliev3r.durable``: the atomic write and the fsync the snapshots, the output swap, the
streamer's progress file, the evaluator's results and the studies' datasets share."""

import errno
import os
import stat

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


def test_write_with_a_mode_makes_its_temporary_file_afresh_with_that_mode_whatever_the_umask(tmp_path, monkeypatch):
    """A key's secret goes through ``write`` too, and is never readable by others, not even in its
    temporary file: with ``mode`` the temporary file is made afresh (one left there, of another
    mode, is not written into) with that mode, set whatever the umask before a byte is written,
    and the file renamed into place has it."""
    path, tmp, held = tmp_path / "server.key_secret", tmp_path / "server.key_secret.tmp", tmp_path / "held"
    renamed, real = [], os.replace

    def replace(src, dst):
        st = os.stat(src)
        renamed.append((stat.S_IMODE(st.st_mode), st.st_ino != held.stat().st_ino))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    for mode, umask in ((0o600, 0), (0o644, 0o077), (0o600, 0o022)):
        tmp.write_text("left by a killed writer")
        tmp.chmod(0o666)
        held.unlink(missing_ok=True)
        os.link(tmp, held)  # the stale file, kept to see whether it was written into
        old = os.umask(umask)
        try:
            durable.write(path, f"secret {mode:o}", tmp=tmp, mode=mode)
        finally:
            os.umask(old)
        assert stat.S_IMODE(path.stat().st_mode) == mode and path.read_text() == f"secret {mode:o}"
        assert renamed[-1] == (mode, True) and not tmp.exists()
        assert held.read_text() == "left by a killed writer" and stat.S_IMODE(held.stat().st_mode) == 0o666


def test_write_leaves_the_folder_to_its_caller_when_asked(tmp_path, folder_fsyncs, fsynced):
    """A caller writing several files into one folder (the evaluator's pictures) flushes the
    folder once after the last: each file's bytes are still flushed before its rename."""
    path = tmp_path / "a.png"
    flushed = folder_fsyncs(tmp_path, path.exists)
    durable.write(path, b"picture", tmp=tmp_path / "a.png.tmp", fsync_folder=False)
    assert path.read_bytes() == b"picture" and path in fsynced and flushed == []
    durable.write(path, b"again", tmp=tmp_path / "a.png.tmp")
    assert flushed == [True]


@pytest.mark.parametrize("mode", [None, 0o600])
def test_a_write_the_full_disk_refuses_leaves_no_temporary_file_and_the_file_as_it_was(small_disk, mode):
    """On a full disk (ENOSPC) the temporary file was left, a part of it, "for the caller to
    remove": a caller that did not (the streamer's progress, the evaluator's results, the report,
    the studies' files) left it taking the room it had, on the disk that was full. The write now
    removes its own temporary file, whatever its mode, and the file stands as it was."""
    disk = small_disk(1 << 20)
    path, tmp = disk.path / "state.json", disk.path / "state.json.tmp"
    path.write_text("earlier")
    disk.fill()
    with pytest.raises(OSError) as refused:
        durable.write(path, "x" * (64 << 10), tmp=tmp, mode=mode)
    assert refused.value.errno == errno.ENOSPC
    assert path.read_text() == "earlier" and not tmp.exists()
    with pytest.raises(OSError) as refused:
        durable.write_temporary(tmp, "x" * (64 << 10), mode=mode)
    assert refused.value.errno == errno.ENOSPC and not tmp.exists()
    disk.free()
    durable.write(path, "new", tmp=tmp, mode=mode)
    assert path.read_text() == "new" and not tmp.exists()


def test_a_rename_that_fails_leaves_no_temporary_file(tmp_path):
    """The temporary file is whole, but its rename fails (here: a folder holds the name): it is
    removed, and the folder stays as it was."""
    path, tmp = tmp_path / "taken", tmp_path / "taken.tmp"
    path.mkdir()
    (path / "inside").write_text("kept")
    with pytest.raises(OSError):
        durable.write(path, "new", tmp=tmp)
    assert not tmp.exists() and (path / "inside").read_text() == "kept"
