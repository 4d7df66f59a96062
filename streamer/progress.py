"""Resumable progress for archives: ``<run.dir>/streamer/progress.json``.

A window is done once acknowledged. Per source we persist where to start decoding again (the
first frame of the oldest window not yet acknowledged, or of the last window made when every
window so far is acknowledged), the ids of windows acknowledged from that point on
(acknowledgements arrive out of order), and the blur test's recent sharpness values that
window's first view was tested against (``streamer.windows.Window.blur_history``), so a
restarted streamer neither starts from zero nor sends an acknowledged window again. The resume
point is always a window's first frame: a window builder started there, with those sharpness
values, makes that window and the ones after it as the run before did, whereas where the next
window begins is not known until it is made (after a scene cut or a gap it may begin anywhere
after the last one's first frame, and with ``window_step`` beyond a window's span anywhere from
``window_step`` after it, where the keyframe gates keep a view). A last window acknowledged is
thus made again after a restart, and skipped. Window ids are ``source:pass:first_frame`` and
stable across restarts, so a window re-made after a crash keeps its id (replay stores it once).

Each video file's identity (device, inode, size, modification time:
``streamer.sources.file_state``) is kept too, from when it was opened, with the generation of
its content: 0 for the first, one more each time another file took its name (rsync and ``mv``
rename a new file over the old). Content of a later generation is read from its start, its
progress kept apart from the old content's (whose records and windows still out are forgotten)
and its window ids carry the generation in their pass (``source:0r1:first_frame``: pass 0, the
name's second content), so replay does not take its windows for the old content's; those of the
first content keep the ids above. A file of the kept size and modification time is the same
content whatever its inode or device (``streamer.sources.same_content``: a copy that kept its
times, a folder moved to another disk). A file without a kept identity (a progress file written before
identities were kept) is taken as unchanged.

The file is written atomically and durably (``reliev3r.durable.write``: temporary
file, fsync, rename, fsync of the folder) after every batch of acknowledgements; a crash
between an acknowledgement and the write costs one re-send, never a lost window. A write the
disk refuses (full) leaves the file as it was and the progress in memory, written by a later
save once there is room (``streamer.service.StreamerService.save_progress``); a crash meanwhile
costs the re-sends of the windows acknowledged since the last write. Live feeds are not tracked
(they cannot be rewound).
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from reliev3r import durable

log = logging.getLogger("reliev3r.streamer.progress")
VERSION = 1


def window_first_frame(window_id: str) -> int:
    return int(window_id.rsplit(":", 1)[1])


class Progress:
    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.pass_index = 0
        # name -> {"resume": int, "acked": [ids], "done": bool, "blur_history": [floats]}
        self.sources: dict[str, dict] = {}
        # window id -> its source and blur_history (made, not yet acknowledged)
        self.pending: dict[str, tuple[str, tuple[float, ...]]] = {}
        # source -> its last window's first frame and blur_history
        self.last_made: dict[str, tuple[int, tuple[float, ...]]] = {}
        # a video file's source name -> its identity when opened (streamer.sources.file_state), its generation
        self.files: dict[str, tuple[tuple[int, ...], int]] = {}
        self.dirty = False
        self.skipped = 0
        """Windows not made again because they were acknowledged before a restart."""
        self.finished_before = 0
        """Sources not decoded again because they were finished before a restart."""
        self.lock = threading.Lock()
        if self.path is not None and self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            state = json.loads(self.path.read_text())
            if state.get("version") != VERSION:
                raise ValueError(f"version {state.get('version')}")
            # blur_history: absent from files written before it (such a source resumes with none)
            sources = {str(k): {"resume": int(v["resume"]), "acked": [str(a) for a in v["acked"]],
                                "done": bool(v["done"]),
                                "blur_history": [float(x) for x in v.get("blur_history", [])]}
                       for k, v in state["sources"].items()}
            # files: absent from files written before identities were kept (each taken as unchanged)
            files = {str(k): (tuple(int(x) for x in v["state"]), int(v["generation"]))
                     for k, v in state.get("files", {}).items()}
            if any(len(identity) != 4 for identity, _ in files.values()):
                raise ValueError("a file identity that is not 4 numbers")
            self.pass_index, self.sources, self.files = int(state["pass"]), sources, files
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            # Unreadable progress costs re-sent windows (replay deduplicates), not a dead streamer.
            log.warning("progress file unreadable, starting from zero",
                        extra={"path": str(self.path), "detail": str(err)})

    # ------------------------------------------------------------------ producer side
    def start_frame(self, source: str) -> int | None:
        """Frame to resume ``source`` at in the current pass; None when it is finished."""
        with self.lock:
            rec = self.sources.get(source)
            if rec is None:
                return 0
            return None if rec["done"] else rec["resume"]

    def blur_history(self, source: str) -> tuple[float, ...]:
        """What the window builder resuming ``source`` at :meth:`start_frame` starts its blur
        test with: the ``blur_history`` of the window made at that frame in the run before."""
        with self.lock:
            rec = self.sources.get(source)
            return () if rec is None else tuple(rec["blur_history"])

    def is_acked(self, window_id: str, source: str | None = None) -> bool:
        """Whether ``window_id`` was acknowledged before a restart; ``source``: the progress key
        it was made under (a segment's, ``name@first_frame``), else its id's source name."""
        source = source if source is not None else window_id.rsplit(":", 2)[0]
        with self.lock:
            rec = self.sources.get(source)
            return rec is not None and window_id in rec["acked"]

    def made(self, source: str, window_id: str, blur_history: tuple[float, ...] = ()) -> None:
        """``blur_history``: the window's (``streamer.windows.Window.blur_history``)."""
        with self.lock:
            self.pending[window_id] = (source, tuple(blur_history))
            self.last_made[source] = (window_first_frame(window_id), tuple(blur_history))
            self.sources.setdefault(source, _fresh())

    def source_done(self, source: str) -> None:
        with self.lock:
            self.sources.setdefault(source, _fresh())["done"] = True
            self.dirty = True

    def file(self, name: str) -> tuple[tuple[int, ...] | None, int]:
        """The identity the video file of source ``name`` had when last opened (None where none
        is kept) and the generation of its content (0: the first)."""
        with self.lock:
            identity, generation = self.files.get(name, (None, 0))
            return identity, generation

    def opened(self, name: str, identity: tuple[int, ...]) -> None:
        """Keep ``identity`` as the video file's of source ``name`` (the same content: its
        generation stays)."""
        with self.lock:
            self.files[name] = (tuple(identity), self.files.get(name, (None, 0))[1])
            self.dirty = True

    def grown(self, name: str, identity: tuple[int, ...]) -> bool:
        """The video file of source ``name`` grew, to ``identity``: it is read on from its resume
        point, so it is not done any more (a restart during the read-on goes on with it). Returns
        whether it was done."""
        with self.lock:
            self.files[name] = (tuple(identity), self.files.get(name, (None, 0))[1])
            rec = self.sources.get(name)
            was_done = rec is not None and rec["done"]
            if rec is not None:
                rec["done"] = False
            self.dirty = True
            return was_done

    def replaced(self, name: str, identity: tuple[int, ...]) -> int:
        """Another file under the name of source ``name``, of ``identity``: new content, read from
        its start. Forgets the old content's records (the whole file's and its segments',
        ``name@first_frame``) and its windows still out; returns the new content's generation."""
        with self.lock:
            generation = self.files.get(name, (None, 0))[1] + 1
            self.files[name] = (tuple(identity), generation)
            for key in [k for k in self.sources.keys() | self.last_made.keys() if _of_file(k, name)]:
                self.sources.pop(key, None)
                self.last_made.pop(key, None)
            self.pending = {wid: entry for wid, entry in self.pending.items() if not _of_file(entry[0], name)}
            self.dirty = True
            return generation

    def new_pass(self, pass_index: int) -> None:
        """Start another pass over the archives at once: the windows of the pass before still
        out are forgotten (their acknowledgements, when they come, find nothing to record), so
        progress never has to remember two passes. (Waiting for them cost a looping streamer on
        short clips the labelers' whole queue at every pass.) A restart before they are
        acknowledged does not send them again: the pass they belong to is over, and its frames
        come again in this one."""
        with self.lock:
            self.pending = {}
            self.pass_index, self.sources, self.last_made, self.files = pass_index, {}, {}, {}
            self.dirty = True

    # ------------------------------------------------------------------ acknowledgements
    def acked(self, window_id: str) -> None:
        with self.lock:
            entry = self.pending.pop(window_id, None)
            if entry is None:
                return  # of a pass before, not ours (a live feed) or a late duplicate
            self.sources[entry[0]]["acked"].append(window_id)
            self.dirty = True

    def snapshot(self) -> dict:
        """The state to persist, with resume points recomputed and acked lists trimmed."""
        with self.lock:
            oldest: dict[str, tuple[int, tuple[float, ...]]] = {}  # source -> first frame, blur_history
            for wid, (source, history) in self.pending.items():
                first = window_first_frame(wid)
                if source not in oldest or first < oldest[source][0]:
                    oldest[source] = (first, history)
            out = {}
            for source, rec in self.sources.items():
                if source in oldest:
                    (resume, history), done = oldest[source], False  # finished decoding, windows still out
                elif source in self.last_made:  # every window made is acknowledged
                    (resume, history), done = self.last_made[source], rec["done"]
                else:
                    resume, history, done = rec["resume"], rec["blur_history"], rec["done"]
                acked = sorted({a for a in rec["acked"] if window_first_frame(a) >= resume},
                               key=window_first_frame)
                rec["acked"] = acked
                out[source] = {"resume": resume, "acked": acked, "done": done, "blur_history": list(history)}
            files = {name: {"state": list(identity), "generation": generation}
                     for name, (identity, generation) in self.files.items()}
            return {"version": VERSION, "pass": self.pass_index, "sources": out, "files": files}

    def save(self, force: bool = False) -> bool:
        """Write the state where it changed since the last write (or ``force``); whether it was
        written. A write the disk refuses (full, an I/O error) raises its ``OSError``, the file as
        it was and no temporary file left; the state stays changed, so the next call writes it."""
        if self.path is None:
            return False
        with self.lock:
            if not (self.dirty or force):
                return False
            self.dirty = False  # a change made while this write is under way is written by the next
        try:
            state = self.snapshot()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            durable.write(self.path, json.dumps(state), tmp=self.path.with_name(self.path.name + ".tmp"))
        except BaseException:
            with self.lock:
                self.dirty = True
            raise
        return True


def _of_file(key: str, name: str) -> bool:
    """Whether progress key ``key`` is the video file of source ``name``'s: its own or one of its
    segments' (``name@first_frame``)."""
    return key == name or (key.startswith(name + "@") and key[len(name) + 1:].isdigit())


def generation_pass(pass_index: int | str, generation: int) -> int | str:
    """The pass part of the window ids of a file's content of ``generation``: the pass itself for
    the first content (its ids as ever), ``<pass>r<generation>`` for a later one."""
    return pass_index if generation == 0 else f"{pass_index}r{generation}"


def _fresh() -> dict:
    """A source's record before any of its windows is acknowledged."""
    return {"resume": 0, "acked": [], "done": False, "blur_history": []}
