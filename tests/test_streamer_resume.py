"""Resumable archives: a real ``reliev3r stream`` process is SIGKILLed mid-run and started
again; acknowledged windows are never sent again, un-acknowledged ones are, and the stream
goes on past where it stopped. Plus the progress file's own rules, and a full disk under the run
folder (the progress file, the synthetic world)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import yaml
import zmq

from reliev3r import protocol
from reliev3r.config import free_port
from reliev3r.protocol import Message
from streamer.config import StreamerConfig
from streamer.progress import Progress
from streamer.service import window_stream
from streamer.sources import discover, source_name
from streamer_media import EVERY_SECOND_FRAME as FILES
from streamer_media import arriving as arriving_upload
from streamer_media import encode, panning_frames, still

REPO = Path(__file__).resolve().parents[1]
HANG_S = 300.0
"""Bounds a hang only: every wait ends as soon as what it waits for happened."""


def start_streamer(config: Path, log=subprocess.DEVNULL) -> subprocess.Popen:
    """``log``: a file for its output (its JSON-lines log)."""
    return subprocess.Popen([sys.executable, "-m", "reliev3r.cli", "stream", "--config", str(config)],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT if log is not subprocess.DEVNULL else log,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


def stream_config(tmp_path: Path, clip: Path, **streamer) -> tuple[Path, int]:
    """A ``reliev3r stream`` config file for ``clip`` (the run under ``tmp_path``; 2 views of 48x32
    2 frames apart, a window every 4 frames, no loop; ``streamer``: more of that section) and the
    work port it listens on."""
    port = free_port()
    config = tmp_path / "stream.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"dir": str(tmp_path / "run")},
        "network": {"work_port": port, "replay_port": free_port()},
        "monitoring": {"enabled": False},
        "streamer": {"sources": [str(clip)], "views": 2, "height": 32, "width": 48, "frame_stride": 2,
                     "window_step": 4, "loop": False, **streamer}}))
    return config, port


def receive(sock, ack, seconds=HANG_S, *, stop_after=None, stop_when=lambda: False):
    """Windows received until ``stop_after`` of them or ``stop_when()`` (``seconds`` bounds a
    hang); ``ack(window_id)`` decides which get a ``done``."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (stop_after is None or len(got) < stop_after) and not stop_when():
        sock.send_multipart(protocol.encode(Message("ready", {"credits": 4})))
        if sock.poll(100):
            msg = protocol.decode(sock.recv_multipart())
            wid = msg.meta["window_id"]
            got.append(wid)
            if ack(wid):
                sock.send_multipart(protocol.encode(Message("done", {"window_id": wid, "status": "stored",
                                                                      "reason": ""})))
    return got


def first_frame(wid):
    return int(wid.rsplit(":", 1)[1])


def test_sigkill_and_restart_resumes_without_resending_acked(tmp_path):
    clip = encode(tmp_path / "pan.mp4", panning_frames(120, 96, 64, step=3))
    config, port = stream_config(tmp_path, clip, max_in_flight=6, resend_timeout_s=30.0)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)  # a minimal labeler/replay peer
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    progress_file = tmp_path / "run" / "streamer" / "progress.json"
    order: dict[str, int] = {}
    proc = start_streamer(config)
    try:
        # Acknowledge out of order: every window except the 3rd and the 6th.
        first_run = receive(sock, lambda wid: order.setdefault(wid, len(order)) not in (2, 5), stop_after=12)
        assert len(first_run) == 12
        held = {w for w, i in order.items() if i in (2, 5)}
        acked = set(first_run) - held
        oldest_held = min(first_frame(w) for w in held)
        deadline = time.monotonic() + HANG_S  # wait until the last acknowledgement is on disk
        while time.monotonic() < deadline:
            try:
                state = next(iter(json.loads(progress_file.read_text())["sources"].values()))
                if state["resume"] == oldest_held and len(state["acked"]) == sum(
                        first_frame(w) > oldest_held for w in acked):
                    break
            except (OSError, ValueError, StopIteration):
                pass
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        state = next(iter(json.loads(progress_file.read_text())["sources"].values()))
        assert state["resume"] == oldest_held and not state["done"]  # the oldest un-acked window
        proc = start_streamer(config)  # restart; everything is acknowledged from here on
        second_run = receive(sock, lambda wid: True, stop_when=lambda: proc.poll() is not None)
        proc.wait(60)  # loop: false, every window done: the streamer exits by itself (bounds a hang)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close(linger=0)
        ctx.destroy(linger=0)
    assert not acked & set(second_run), "an acknowledged window was sent again"
    assert held <= set(second_run), "un-acknowledged windows are sent again after the restart"
    assert max(first_frame(w) for w in second_run) > max(first_frame(w) for w in first_run), "the stream goes on"
    assert min(first_frame(w) for w in second_run) == min(first_frame(w) for w in held)  # not from zero
    everything = acked | set(second_run)
    assert len(everything) >= 15  # 120 frames; the rotation-only pan waits for 12 px of flow per view


def test_progress_file_rules(tmp_path):
    path = tmp_path / "streamer" / "progress.json"
    p = Progress(path)
    for first in (0, 4, 8, 12):
        p.made("s", f"s:0:{first}", (0.1 * first, 1 / 3))  # the blur test's history for the window
    p.acked("s:0:0")
    p.acked("s:0:8")  # out of order: 4 is still out
    assert p.save() and not list(path.parent.glob("*.tmp"))
    q = Progress(path)
    assert q.start_frame("s") == 4 and q.is_acked("s:0:8") and not q.is_acked("s:0:4") and not q.is_acked("s:0:0")
    assert q.blur_history("s") == (0.1 * 4, 1 / 3)  # the resumed window's, exactly
    assert q.start_frame("other") == 0 and q.blur_history("other") == ()
    p.acked("s:0:4")
    p.acked("s:0:12")
    p.save()  # every window acknowledged: from the last one's first frame, which is made again and skipped
    q = Progress(path)
    assert q.start_frame("s") == 12 and q.is_acked("s:0:12") and not q.is_acked("s:0:8")
    assert q.blur_history("s") == (0.1 * 12, 1 / 3)
    q.save(force=True)  # nothing made since the restart: the resume point and its history stay
    assert Progress(path).start_frame("s") == 12 and Progress(path).blur_history("s") == (0.1 * 12, 1 / 3)
    p.source_done("s")
    p.save()
    q = Progress(path)
    assert q.start_frame("s") is None  # finished, all acknowledged
    path.write_text("{broken")
    assert Progress(path).start_frame("s") == 0  # unreadable: from zero, not a crash
    path.write_text(json.dumps({"version": 1, "pass": 0, "sources": {"s": {"resume": 8, "acked": [], "done": False}}}))
    assert Progress(path).start_frame("s") == 8 and Progress(path).blur_history("s") == ()  # written before it was kept
    p.made("t", "t:0:0")
    p.new_pass(1)  # at once: the old pass's window still out does not hold the new pass back
    assert p.pass_index == 1 and p.start_frame("t") == 0 and p.start_frame("s") == 0
    p.made("t", "t:1:0")
    p.acked("t:0:0")  # the old pass's, late: forgotten, nothing of the new pass moves
    p.save()
    q = Progress(path)
    assert q.pass_index == 1 and q.start_frame("t") == 0 and not q.is_acked("t:1:0")
    p.acked("t:1:0")
    p.save()
    q = Progress(path)  # the new pass goes on at its window, made again and skipped as acknowledged
    assert q.start_frame("t") == 0 and q.is_acked("t:1:0")
    assert not p.pending


def test_a_restart_after_every_kill_point_makes_the_windows_of_an_uninterrupted_run(tmp_path):
    """Killed after any window, every window so far acknowledged (the last one on disk), and
    started again: the windows of both runs together are those of a run never killed (ids and
    views), and none acknowledged comes again. The clip cuts to another scene at frame 37, where
    the window builder starts afresh, and window_step is beyond a window's span: the window
    after the last one acknowledged may begin anywhere past its first frame, so only a window's
    first frame is a place to resume at. Frames 32 and 45 are blurred: the blur test (on, as by
    default) skips them against the running median of the candidates before them, which the
    restarted run must start with too (with fewer than 5 values it tests nothing, and would keep
    them). (Through a decode worker: ``tests/test_streamer_workers.py``.)"""
    # another texture and hue at 0.7 of the contrast: 0.49 of the sharpness, not blurred at a blur_ratio of 0.35
    second_scene = (panning_frames(40, 96, 64, step=3, seed=1) * 0.7).astype(np.uint8)
    second_scene += np.array([76, 0, 0], np.uint8)
    frames = np.concatenate([panning_frames(37, 96, 64, step=3), second_scene])
    blurred = (32, 45)
    for i in blurred:
        frames[i] = cv2.GaussianBlur(frames[i], (0, 0), 2.0)
    clip = encode(tmp_path / "cut.mp4", frames)
    cfg = StreamerConfig(sources=[str(clip)], views=2, height=32, width=48, frame_stride=2, window_step=8,
                         loop=False)
    assert cfg.blur_ratio > 0  # the default

    def windows(progress):
        return window_stream(lambda: discover([str(clip)], on_error=print, ground_truth=False), cfg,
                             on_frame=lambda source: None, on_error=print, log=logging.getLogger("test"),
                             progress=progress)

    def made(window):
        return window.window_id, [v.index for v in window.views]

    whole = [made(w) for w in windows(None)]
    cut = next(i for i, (_, views) in enumerate(whole) if views[0] >= 37)
    assert whole[cut][1][0] < whole[cut - 1][1][0] + cfg.window_step  # the case a resume must not skip
    assert not {i for _, views in whole for i in views} & set(blurred)  # the blur test skipped them
    assert {first + 1 for first in blurred} <= {views[0] for _, views in whole}  # a window begins after each
    for kill in range(len(whole)):
        path = tmp_path / f"kill-{kill}" / "progress.json"
        progress = Progress(path)
        first = []
        for window in windows(progress):
            first.append(made(window))
            progress.acked(window.window_id)
            progress.save()
            if len(first) > kill:
                break  # SIGKILL: everything so far acknowledged and on disk, the next window not made
        again = [made(w) for w in windows(Progress(path))]
        assert not {w for w, _ in first} & {w for w, _ in again}, f"killed after {first[-1]}: acked sent again"
        assert first + again == whole, f"killed after {first[-1]}"


def test_a_finished_finite_run_started_again_sends_nothing_and_exits_0(tmp_path):
    """loop: false, every window done: the streamer started again on the same run (by hand, or
    by the supervisor after a SIGKILL that came once every window was acknowledged) has nothing
    left to send and exits 0, saying why; an exit 1 read as a failed start to the supervisor,
    which ended the whole run after ``GIVE_UP_AFTER`` of them. Also when it was killed before
    the source's end was on disk: the last window, acknowledged, is made again and skipped."""
    clip = encode(tmp_path / "pan.mp4", panning_frames(40, 96, 64, step=3))
    config, port = stream_config(tmp_path, clip)
    progress_file = tmp_path / "run" / "streamer" / "progress.json"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://127.0.0.1:{port}")
    runs = []
    try:
        for run in ("first", "again", "killed before the end was saved"):
            if run == "killed before the end was saved":
                state = json.loads(progress_file.read_text())
                for source in state["sources"].values():
                    source["done"] = False
                progress_file.write_text(json.dumps(state))
            with open(tmp_path / f"{run}.log", "w") as log:
                proc = start_streamer(config, log)
                try:
                    got = receive(sock, lambda wid: True, stop_when=lambda: proc.poll() is not None)
                    runs.append((run, got, proc.wait(60)))
                finally:
                    if proc.poll() is None:
                        proc.kill()
    finally:
        sock.close(linger=0)
        ctx.destroy(linger=0)
    (_, first, code), *restarts = runs
    assert first and code == 0
    for run, got, code in restarts:
        assert (got, code) == ([], 0), run
    assert "every source finished in an earlier run" in (tmp_path / "again.log").read_text()


def test_the_progress_file_survives_a_power_loss_once_saved(tmp_path, folder_fsyncs):
    """``save`` renamed the new file into place but never flushed its folder: after a power
    loss the earlier file could stand again, and its window, acknowledged since, be sent again."""
    path = tmp_path / "streamer" / "progress.json"
    p = Progress(path)
    p.made("s", "s:0:0")
    p.made("s", "s:0:4")
    p.save(force=True)
    flushed = folder_fsyncs(path.parent, lambda: Progress(path).is_acked("s:0:4"))
    p.acked("s:0:4")
    assert p.save()
    assert flushed and flushed[-1] is True  # the folder flushed once it names the new file


def test_a_source_too_short_for_a_window_fails_every_start_not_only_the_first(tmp_path):
    """A clip shorter than a window makes none: the streamer exits 1 (a failed start, which
    ``up`` counts towards stopping the run with that error). Started again on the same run it
    must fail again: it once marked the windowless source done in its progress file, so the
    second start counted it as "finished in an earlier run" and exited 0, and ``up`` then waited
    forever for windows that no stage would make."""
    clip = encode(tmp_path / "short.mp4", panning_frames(2, 96, 64, step=3))  # a window spans 3
    codes = {}
    for loop in (False, True):
        (tmp_path / f"loop-{loop}").mkdir()
        config, port = stream_config(tmp_path / f"loop-{loop}", clip, loop=loop)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)  # a labeler asking for windows
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        try:
            for start in ("first", "again"):
                log_path = tmp_path / f"loop-{loop}" / f"{start}.log"
                with open(log_path, "w") as log:
                    proc = start_streamer(config, log)
                    try:
                        got = receive(sock, lambda wid: True, stop_when=lambda: proc.poll() is not None)
                        codes[loop, start] = (got, proc.wait(60))
                    finally:
                        if proc.poll() is None:
                            proc.kill()
                assert "too_short" in log_path.read_text(), (loop, start)
        finally:
            sock.close(linger=0)
            ctx.destroy(linger=0)
    assert codes == {(loop, start): ([], 1) for loop in (False, True) for start in ("first", "again")}


class Errors(list):
    def __call__(self, source, reason, detail):
        self.append((source, reason))


def _made(spec: Path, progress: Progress | None, errors: Errors, *, kill_after: int | None = None,
          cfg: StreamerConfig | None = None):
    """(id, views) of the windows ``reliev3r stream`` makes of ``spec``, each acknowledged and
    saved at once; with ``kill_after``, the run is SIGKILLed after that many."""
    out = []
    for window in window_stream(lambda: discover([str(spec)], on_error=errors), cfg or StreamerConfig(**FILES),
                                on_frame=lambda s: None, on_error=errors, log=logging.getLogger("t"),
                                progress=progress):
        out.append((window.window_id, [v.index for v in window.views]))
        if progress is not None:
            progress.acked(window.window_id)
            progress.save()
        if kill_after is not None and len(out) >= kill_after:
            return out
    if progress is not None:
        progress.save()  # the sources' ends, as the streamer saves them on its next turn
    return out


def _unnamed(made):
    """``made`` as a file of another name makes it: (pass, first frame, views) of each window."""
    return [(*wid.rsplit(":", 2)[1:], views) for wid, views in made]


def test_a_video_replaced_before_a_restart_is_read_from_the_start_as_new_content(tmp_path):
    """A finished source replaced under its name (renamed over by rsync or ``mv``) while the
    streamer was down: progress.json marked it done by name, and the new content was skipped.
    Its identity (device, inode, size, modification time) is kept with its progress: found
    another, the file is read from the start, said once as ``replaced``, under window ids other
    than the old content's; killed and started again while it is read, the run goes on as an
    uninterrupted one, and once done it is done."""
    old, new = panning_frames(30, 64, 48, seed=2), panning_frames(40, 64, 48, seed=3)
    clip = still(encode(tmp_path / "clip.ts", old))
    path = tmp_path / "run" / "progress.json"
    errors = Errors()
    first = _made(clip, Progress(path), errors)
    assert first and errors == []
    (tmp_path / "incoming").mkdir()
    os.replace(still(encode(tmp_path / "incoming" / "clip.ts", new)), clip)  # a new inode under the name
    (tmp_path / "copy").mkdir()
    copy = tmp_path / "copy" / "progress.json"
    copy.write_bytes(path.read_bytes())
    whole = _made(clip, Progress(copy), Errors())  # uninterrupted
    (tmp_path / "new").mkdir()
    alone = _made(encode(tmp_path / "new" / "clip.ts", new), None, Errors())
    assert [views for _, views in whole] == [views for _, views in alone]  # the new content, all of it
    assert not {w for w, _ in first} & {w for w, _ in whole}  # replay would drop them as duplicates
    killed = _made(clip, Progress(path), errors, kill_after=3)
    again = _made(clip, Progress(path), errors)
    assert killed + again == whole
    assert errors == [(source_name(clip), "replaced")]
    assert _made(clip, Progress(path), errors) == [] and len(errors) == 1  # done


def test_a_video_copied_over_itself_with_its_times_kept_is_no_new_content(tmp_path):
    """The same file under another inode or device, its size and modification time kept (``cp
    -p``, ``rsync -a`` of unchanged footage, data and run folder moved to another disk): the
    same content, not read again nor said to be replaced, as a file renamed over it with another
    size or time is."""
    clip = still(encode(tmp_path / "clip.ts", panning_frames(30, 64, 48, seed=2)))
    path = tmp_path / "run" / "progress.json"
    errors = Errors()
    assert _made(clip, Progress(path), errors) and errors == []
    (tmp_path / "copy").mkdir()
    os.replace(shutil.copy2(clip, tmp_path / "copy" / "clip.ts"), clip)  # another inode, the same times
    assert _made(clip, Progress(path), errors) == [] and errors == []


def test_a_finished_video_that_grew_before_a_restart_is_read_on_from_its_last_window(tmp_path):
    """A finished source that grew while the streamer was down (a writer that stalled past
    ``settle_s``, then went on): progress.json marked it done, and its later part was never
    read. It is read on from its last window, said once as ``grew``: both runs make the windows
    (ids and views) of the whole file read at once, none twice."""
    whole_bytes = encode(tmp_path / "whole.ts", panning_frames(40, 64, 48)).read_bytes()
    (tmp_path / "in").mkdir()
    clip = tmp_path / "in" / "whole.ts"
    clip.write_bytes(whole_bytes[: len(whole_bytes) // 3])
    still(clip)
    path = tmp_path / "run" / "progress.json"
    errors = Errors()
    first = _made(clip, Progress(path), errors)
    assert first and errors == []
    with clip.open("ab") as out:
        out.write(whole_bytes[len(whole_bytes) // 3:])
    still(clip)
    second = _made(clip, Progress(path), errors)
    assert _unnamed(first + second) == _unnamed(_made(tmp_path / "whole.ts", None, Errors()))
    assert errors == [(source_name(clip), "grew")]
    assert _made(clip, Progress(path), errors) == [] and len(errors) == 1


def test_a_read_on_killed_before_it_ends_goes_on_after_a_restart(tmp_path):
    """A file that grew after it was read is read on before a finite run ends; killed during
    the read-on, progress.json still said the file was done (its flag from the first read), so a
    restart skipped the rest. It goes on from the last window acknowledged."""
    whole_bytes, arriving = arriving_upload(tmp_path)
    folder = arriving.parent
    cfg = StreamerConfig(**{**FILES, "settle_s": 60.0, "interleave": 1})
    path = tmp_path / "run" / "progress.json"
    progress, errors, first = Progress(path), Errors(), []
    for window in window_stream(lambda: discover([str(folder)], on_error=errors), cfg, on_frame=lambda s: None,
                                on_error=errors, log=logging.getLogger("t"), progress=progress):
        if window.source == source_name(folder / "b-other.ts") and arriving.stat().st_size < len(whole_bytes):
            with arriving.open("ab") as out:
                out.write(whole_bytes[len(whole_bytes) // 3:])
            still(arriving)
        first.append((window.window_id, [v.index for v in window.views]))
        progress.acked(window.window_id)
        progress.save()
        if errors and window.source == source_name(arriving):
            break  # SIGKILL after the first window read on, acknowledged and on disk
    assert errors == [(source_name(arriving), "grew")]
    again = _made(folder, Progress(path), errors, cfg=cfg)
    mine = [w for w in first + again if w[0].startswith(source_name(arriving) + ":")]
    (tmp_path / "alone").mkdir()
    whole = tmp_path / "alone" / "a-arriving.ts"
    whole.write_bytes(whole_bytes)
    assert _unnamed(mine) == _unnamed(_made(whole, None, Errors())) and len(errors) == 1


def test_progress_keeps_each_files_identity_and_generation(tmp_path):
    """A file's identity and content generation survive a restart; a progress file written
    before they were kept loads with none (each file taken as unchanged); a replaced file's old
    records, its segments' and its windows still out are forgotten, so acknowledgements of the
    old content move nothing of the new."""
    path = tmp_path / "progress.json"
    path.write_text(json.dumps({"version": 1, "pass": 0, "sources": {
        "s": {"resume": 8, "acked": ["s:0:8"], "done": True, "blur_history": []}}}))
    p = Progress(path)
    assert p.file("s") == (None, 0) and p.start_frame("s") is None  # as it was
    p.opened("s", (1, 2, 300, 4))
    p.made("s@1500", "s:0:1500")
    p.made("t", "t:0:0")
    p.save()
    assert Progress(path).file("s") == ((1, 2, 300, 4), 0) and Progress(path).start_frame("s") is None
    assert p.replaced("s", (1, 9, 200, 5)) == 1
    assert p.start_frame("s") == 0 and p.start_frame("s@1500") == 0 and list(p.pending) == ["t:0:0"]
    p.acked("s:0:1500")  # the old content's, late: nothing to record
    p.made("s", "s:0r1:0")
    p.acked("s:0r1:0")
    p.save()
    q = Progress(path)
    assert q.file("s") == ((1, 9, 200, 5), 1) and q.start_frame("s") == 0 and q.is_acked("s:0r1:0", "s")
    assert not q.is_acked("s:0:8", "s") and q.start_frame("s@1500") == 0
    assert q.grown("s", (1, 9, 400, 6)) is False and q.file("s") == ((1, 9, 400, 6), 1)
    q.source_done("s")
    assert q.grown("s", (1, 9, 500, 7)) is True and q.start_frame("s") == 0  # read on: not done any more
    q.new_pass(1)
    assert q.file("s") == (None, 0)  # a new pass reads every file afresh


def test_a_progress_file_the_full_disk_refuses_is_said_once_and_windows_keep_flowing(tmp_path, make_cfg, stage,
                                                                                      wait_for, ctx, small_disk,
                                                                                      caplog):
    """The run folder on a disk that fills up: the progress file written after each batch of
    acknowledgements met ENOSPC, which went out of the streamer's loop and ended it (and its
    restart met the full disk again at the first acknowledgement). Now the failure is said once
    (an error line with the reason, the status's ``write_error``), no temporary file is left, the
    file stays as it was, windows keep flowing, and the progress kept in memory is written once
    the disk has room again. Each refused write is counted by its errno name, for the alert."""
    import streamer.service as streamer_service

    clip = encode(tmp_path / "pan.mp4", panning_frames(120, 96, 64, step=3))
    disk = small_disk(1 << 20)
    cfg = make_cfg(run={"dir": str(disk.path / "run")},
                   streamer={"sources": [str(clip)], "views": 2, "height": 32, "width": 48, "frame_stride": 2,
                             "window_step": 4, "loop": False, "max_in_flight": 2, "resend_timeout_s": HANG_S})
    progress_file = disk.path / "run" / "streamer" / "progress.json"
    sock = ctx.socket(zmq.DEALER)  # a labeler that acknowledges every window
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cfg.network.connect(cfg.network.work_port))
    with caplog.at_level(logging.INFO, logger="reliev3r.streamer"):
        streamer = stage(streamer_service.run, cfg, "streamer")
        status = streamer.runtime.status
        sent = receive(sock, lambda wid: True, stop_after=2)
        wait_for(progress_file.exists, HANG_S, "the first progress file")
        disk.fill()
        sent += receive(sock, lambda wid: True, stop_when=lambda: "write_error" in status)
        assert status["write_error"] == f"progress: ENOSPC: {os.strerror(errno.ENOSPC)}", status
        refused_writes = ("reliev3r_progress_write_failures_total", {"reason": "ENOSPC"})
        assert streamer.metric(*refused_writes) >= 1  # counted: Reliev3rDiskRefusesWrites fires
        before = progress_file.read_text()
        during = receive(sock, lambda wid: True, stop_after=6)  # acknowledged, so flowing on
        assert len(during) == 6 and not set(during) & set(sent)
        wait_for(lambda: status.get("acked") == len(sent) + len(during), HANG_S, "the acknowledgements counted")
        assert progress_file.read_text() == before and json.loads(before)["sources"]
        # no temporary file left (one is there for the moment of each retry, every second: waited past)
        wait_for(lambda: [p.name for p in progress_file.parent.iterdir()] == ["progress.json"], HANG_S,
                 "the folder without a temporary file")
        disk.free()
        sent += during + receive(sock, lambda wid: True, stop_when=lambda: streamer.rc is not None)
        streamer.thread.join(HANG_S)
        assert streamer.rc == 0 and "write_error" not in status
    assert len(set(sent)) == len(sent) >= 10
    state = next(iter(json.loads(progress_file.read_text())["sources"].values()))
    assert state["done"] is True  # written again once there was room
    refused = [r for r in caplog.records if r.getMessage().startswith("progress not written")]
    assert [(r.levelno, r.reason) for r in refused] == [(logging.ERROR, "ENOSPC")]
    assert [r for r in caplog.records if r.getMessage() == "progress written again"]


def test_a_synthetic_world_the_full_disk_refuses_is_said_once_and_streamed_once_there_is_room(make_cfg, stage,
                                                                                               wait_for, ctx,
                                                                                               small_disk, caplog):
    """The default sources (the synthetic world, rendered into the run folder at the first start)
    on a full disk: the render met ENOSPC, the streamer made no window and exited 1, and the
    supervisor restarted it into the same full disk (a slow crash loop). Now the refusal is said
    once (an error line with the errno's name and the path, the status's ``write_error``), each
    try is counted by its errno name for the alert, the streamer stays up and tries again, and
    the world is rendered and streamed once the disk has room."""
    import streamer.service as streamer_service

    disk = small_disk(1 << 20)
    cfg = make_cfg(run={"dir": str(disk.path / "run")},
                   streamer={"views": 2, "height": 32, "width": 48, "frame_stride": 2, "window_step": 4,
                             "loop": False, "synthetic": {"scenes": 1, "frames": 8, "height": 32, "width": 48}})
    assert cfg.streamer.sources == []  # the synthetic world
    (disk.path / "run").mkdir()
    disk.fill()
    sock = ctx.socket(zmq.DEALER)  # a labeler that acknowledges every window
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cfg.network.connect(cfg.network.work_port))
    refused_writes = ("reliev3r_world_write_failures_total", {"reason": "ENOSPC"})
    with caplog.at_level(logging.INFO, logger="reliev3r.streamer"):
        streamer = stage(streamer_service.run, cfg, "streamer")
        status = streamer.runtime.status
        sent = receive(sock, lambda wid: True,
                       stop_when=lambda: streamer.rc is not None or streamer.metric(*refused_writes) >= 2)
        assert streamer.rc is None and not sent, f"the streamer ended on a full disk: {streamer.rc}"
        assert status["write_error"] == f"synthetic world: ENOSPC: {os.strerror(errno.ENOSPC)}", status
        disk.free()
        sent = receive(sock, lambda wid: True, stop_when=lambda: streamer.rc is not None)
        streamer.thread.join(HANG_S)
        assert streamer.rc == 0 and "write_error" not in status and sent
    refused = [r for r in caplog.records if r.getMessage().startswith("synthetic world not rendered")]
    assert [(r.levelno, r.reason) for r in refused] == [(logging.ERROR, "ENOSPC")]
    assert refused[0].path.startswith(str(disk.path / "run" / "world"))
    assert [r for r in caplog.records if r.getMessage() == "synthetic world rendered"]
