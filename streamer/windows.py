"""Frames -> windows: pick keyframes, fit them to the window size (``reliev3r.imaging``:
resize and centre crop, intrinsics scaled exactly), group V views per window.

Keyframes (candidates are ``frame_stride`` apart):

* scene cuts, tested on consecutive frames: a colour-histogram (HS, Bhattacharyya) jump above
  ``scene_cut_hist`` or a grey-thumbnail jump above ``scene_cut_motion``. Views before a cut
  never share a window with views after it (checked on ``bikes.mp4``'s five hard cuts). The
  test looks at every candidate and at least every ``CUT_LOOK_EVERY``-th frame; the frames
  between are looked at, one by one as before, only when the two frames looked at either side
  of them differ by more than ``CUT_TRIGGER`` of a threshold (the same cuts and windows as
  looking at every frame on the shared videos and 7-Scenes; a flash of a few frames between
  two alike frames looked at is no longer a cut). A frame whose pixels cannot be decoded when
  first looked at (``streamer.sources.FrameLost``: an image decoded lazily, reported by its
  source) is a gap, as a frame flagged ``discontinuity`` after it would be.
* blur: a candidate whose Laplacian variance is below ``blur_ratio`` times the running median
  of recent candidates is skipped (the next frame is tried). A window carries the values its
  first view was tested against (``Window.blur_history``): a builder resumed at that frame after
  a restart starts with them (``streamer.progress``), and keeps the views the run before kept.
* motion: corners tracked (LK) from the last kept view; a candidate whose median flow is below
  ``keyframe_min_flow`` is skipped (a still camera, even with objects moving in view, adds no
  views). Parallax is favoured over rotation: while the best homography explains the flow
  (80th-percentile residual below ``keyframe_min_parallax``: a pure rotation, nothing to triangulate)
  the candidate waits until the flow reaches ``keyframe_rotation_flow``. A camera that stays
  still is tried less often: after every ``STILL_BACKOFF`` still candidates in a row the next
  try moves one frame further on, up to ``frame_stride``. A candidate skipped for too little
  flow (still, or rotation-only) is followed by the frame where the flow, at the speed
  measured since the last kept view, reaches the flow needed (``frames_to_flow``, rounded
  down, at most ``frame_stride`` on): the candidates in between would be skipped at that
  speed, so they are not tracked.

Every test looks at a :class:`Glance` of the frame, made once per frame looked at, at a fixed small size
(a grey image ``MOTION_WIDTH`` wide and a 64x48 colour image), never at the full frame: a video
source makes it straight from the decoder's planes (``streamer.sources``) and converts the full
frame to RGB only for the views it keeps. The corners tracked from the last kept view are found
once per kept view, and the homography only when its parallax can
change the decision. Where the flow expected at the last speed would settle the decision (a
still camera whose next candidate is the same frame for any flow near it, or a fast one), the
strongest 60 % of the corners are tracked first, and the rest only when bounds on the median
of all of them do not settle it: the same decisions as tracking every corner.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from reliev3r import imaging
from reliev3r.protocol import Message
from streamer.glance import COLOUR_SIZE, MOTION_WIDTH, Glance, glance_of_rgb, shrink  # noqa: F401 (MOTION_WIDTH)
from streamer.sources import Frame, FrameLost

THUMB_SIZE = (32, 24)
"""Width, height of the grey thumbnails the scene-cut test compares."""
MIN_TRACKED = 8
STILL_BACKOFF = 4
"""After every this many still candidates in a row the next try moves one frame further on, up
to ``frame_stride`` frames (a still camera is tracked on every frame_stride-th frame, not on
every frame; when it moves again, its next view comes at most frame_stride - 1 frames later)."""
CUT_LOOK_EVERY = 4
"""The cut test looks at every this many frames at least (besides every candidate); the frames
between are kept unlooked-at until the next frame looked at. When that frame and the last one
looked at differ by more than ``CUT_TRIGGER`` of either cut threshold, every frame between is
looked at and the test runs on consecutive frames as before (same cuts, same restarts, same
candidates); otherwise nothing between can have been a cut or a candidate."""
CUT_TRIGGER = 0.5
SHARPNESS_HISTORY = 15
"""Recent candidate sharpness values the blur test compares against (a running median)."""


@dataclass(slots=True)
class View:
    index: int
    timestamp: float
    rgb: np.ndarray
    intrinsics: np.ndarray
    gt_depth: np.ndarray | None
    gt_cam_to_world: np.ndarray | None


@dataclass(slots=True)
class Window:
    window_id: str
    source: str
    views: list[View]
    blur_history: tuple[float, ...] = ()
    """The blur test's recent sharpness values before its first view was tested (oldest first;
    empty with the test off): what a builder started at that frame must start with to make this
    window and the ones after it as this run did. Not part of the wire message."""

    def lacking(self, needed: tuple[str, ...]) -> str | None:
        """Which of the ground truth ``needed`` (``"gt_depth"``, ``"gt_cam_to_world"``: what
        :meth:`to_message` sends only where every view has it) some view lacks, with their frames;
        None when every view has it all. Depth that is partly 0 (unknown) is depth."""
        missing = {name: [v.index for v in self.views if getattr(v, name) is None] for name in needed}
        said = [f"{name} of frame{'s' * (len(frames) > 1)} {', '.join(map(str, frames))}"
                for name, frames in missing.items() if frames]
        return f"window {self.window_id} has no {' nor '.join(said)}" if said else None

    def to_message(self) -> Message:
        arrays = {"frames": np.stack([v.rgb for v in self.views]),
                  "intrinsics": np.stack([v.intrinsics for v in self.views]).astype(np.float32)}
        # Ground truth travels only when every view has it (the schema has no per-view mask).
        if all(v.gt_depth is not None for v in self.views):
            arrays["gt_depth"] = np.stack([v.gt_depth for v in self.views]).astype(np.float32)
        if all(v.gt_cam_to_world is not None for v in self.views):
            arrays["gt_cam_to_world"] = np.stack([v.gt_cam_to_world for v in self.views]).astype(np.float32)
        meta = {"window_id": self.window_id, "source": self.source,
                "frame_indices": [v.index for v in self.views],
                "timestamps": [float(v.timestamp) for v in self.views]}
        return Message("window", meta, arrays)


@dataclass(slots=True, frozen=True)
class Kept:
    """A view a window builder keeps for the windows to come, with the blur test's recent
    sharpness values before it was tested: its window's ``Window.blur_history`` should it be a
    window's first view."""

    view: View
    blur_history: tuple[float, ...]


def resize_view(frame: Frame, width: int, height: int) -> View:
    """Fit a frame (and its GT depth, at any resolution of the same view) to the window size
    with ``reliev3r.imaging``, the one resize-and-crop every stage uses."""
    reduced = getattr(frame, "reduced", None)
    rgb = fit_rgb_reduced(reduced, height, width) if reduced is not None else None
    if rgb is not None:
        src_h, src_w = reduced[2]
    else:
        src_h, src_w = frame.rgb.shape[:2]
        rgb = fit_rgb(frame.rgb, height, width)
    K = _fit_intrinsics(np.asarray(frame.intrinsics, dtype=np.float64).tobytes(), src_h, src_w, height, width).copy()
    depth = None
    if frame.gt_depth is not None:
        depth = imaging.fit_image(frame.gt_depth.astype(np.float32, copy=False), height, width, nearest=True,
                                  like=(src_h, src_w)).copy()
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return View(frame.index, frame.timestamp, rgb, K, depth, frame.gt_cam_to_world)


@functools.lru_cache(maxsize=64)
def _fit_intrinsics(K: bytes, src_h: int, src_w: int, height: int, width: int) -> np.ndarray:
    """``imaging.fit_intrinsics`` of the float64 [3, 3] matrix of bytes ``K``, in float64,
    kept per source size and matrix: a source's frames share them, and the torch round trip
    cost 0.17 ms a view (2-3 % of the streamer's CPU time on bikes.mp4 and Megamind.avi)."""
    matrix = np.frombuffer(K, dtype=np.float64).reshape(3, 3).copy()
    fitted = imaging.fit_intrinsics(matrix, src_h, src_w, height, width).astype(np.float64)
    fitted.flags.writeable = False
    return fitted


def fit_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """``imaging.fit_image``'s resize and centre crop (the same size, crop and geometry), with
    the first factors of 2 of the downscale taken as exact 2x2 means (while both sides are even
    and at least twice the resized size), then area averaging for the rest: 0.6 against 2.9 ms
    at 1296x720, 1.3 against 6.3 ms at 1920x1080 (one view each). Pixels differ from area
    averaging over the whole factor as one box filter differs from another (0.3-1.5 grey levels
    on average on the shared videos); a linear ramp lands within 0.13 levels of it."""
    h, w = rgb.shape[:2]
    plan = imaging.fit_plan(h, w, height, width)
    if not _halvable(h, w, *plan[:2]):
        return imaging.fit_image(rgb, height, width)
    return _halve_and_fit(rgb, plan, height, width)


def _halvable(h: int, w: int, new_w: int, new_h: int) -> bool:
    """Whether an ``h`` x ``w`` image on its way to ``new_w`` x ``new_h`` takes one more exact
    2x2 halving (both sides even and at least twice the resized size)."""
    return w % 2 == 0 and h % 2 == 0 and w >= 2 * new_w and h >= 2 * new_h


def _halve_and_fit(rgb: np.ndarray, plan: tuple[int, int, int, int], height: int, width: int) -> np.ndarray:
    """Exact 2x2 halvings while :func:`_halvable`, area averaging to ``imaging.fit_plan``'s
    size for the rest, then its centre crop."""
    new_w, new_h, left, top = plan
    while _halvable(*rgb.shape[:2], new_w, new_h):
        rgb = cv2.resize(rgb, (rgb.shape[1] // 2, rgb.shape[0] // 2), interpolation=cv2.INTER_AREA)
    if (rgb.shape[1], rgb.shape[0]) != (new_w, new_h):
        rgb = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(rgb[top: top + height, left: left + width])


def halvings(h: int, w: int, height: int, width: int) -> int:
    """How many exact 2x2 halvings :func:`fit_rgb` takes of an ``h`` x ``w`` image on its way
    to ``height`` x ``width`` (0: it resizes in one step)."""
    new_w, new_h, _, _ = imaging.fit_plan(h, w, height, width)
    n = 0
    while _halvable(h, w, new_w, new_h):
        w, h, n = w // 2, h // 2, n + 1
    return n


def fit_rgb_reduced(reduced: tuple, height: int, width: int) -> np.ndarray | None:
    """:func:`fit_rgb` of a frame from an image its source decoded at a reduced scale already
    (``reduced = (factor, image, (full height, full width))``, a JPEG decoded at 1/2, 1/4 or
    1/8 in the DCT): the same size, crop and geometry, when the fit of the full frame would
    halve it at least that often anyway (the reduced image stands in for those halvings; its
    pixels differ from 2x2 means of the full decode as one box filter from another). None
    when it cannot stand in (the view needs more detail, or sizes not divisible)."""
    factor, small, (h, w) = reduced
    small = small() if callable(small) else small  # decoded already where the frame was looked at
    steps = factor.bit_length() - 1
    if (1 << steps != factor or h % factor or w % factor or small.shape[:2] != (h // factor, w // factor)
            or halvings(h, w, height, width) < steps):
        return None
    return _halve_and_fit(small, imaging.fit_plan(h, w, height, width), height, width)


def glance(frame) -> Glance:
    """The frame's glance: made by its source where it can (from the decoder's planes), else
    from its RGB."""
    made = getattr(frame, "glance", None)
    return made if made is not None else glance_of_rgb(frame.rgb)


def thumbnail(grey: np.ndarray) -> np.ndarray:
    """32x24 float thumbnail of a glance's grey image."""
    return cv2.resize(grey, THUMB_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)


def motion_grey(rgb: np.ndarray) -> np.ndarray:
    """Grey image MOTION_WIDTH pixels wide: what the keyframe gate tracks points on."""
    return glance_of_rgb(rgb).grey


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two thumbnails (OpenCV's L1 norm: a quarter of numpy's
    per-call cost, the same value to 1e-8)."""
    return cv2.norm(a, b, cv2.NORM_L1) / a.size


def sharpness(grey: np.ndarray) -> float:
    """Variance of the Laplacian: falls sharply with motion blur and defocus."""
    return float(cv2.meanStdDev(cv2.Laplacian(grey, cv2.CV_32F))[1][0, 0] ** 2)


def hs_histogram(colour: np.ndarray) -> np.ndarray:
    """Normalised 16x16 hue-saturation histogram of a glance's colour image."""
    hsv = cv2.cvtColor(colour, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [16, 16], [0, 180, 0, 256])
    return cv2.normalize(hist, hist, 1.0, 0.0, cv2.NORM_L1)


def colour_histogram(rgb: np.ndarray) -> np.ndarray:
    return hs_histogram(shrink(rgb, COLOUR_SIZE))


@dataclass(slots=True)
class Motion:
    flow: float
    """Median displacement of tracked points, pixels of a MOTION_WIDTH-wide image."""
    parallax: float
    """80th percentile of the best homography's residuals (pixels): ~0 for a pure rotation or a
    plane, growing with translation in a scene with depth (a near layer of a fifth of the
    points is enough to show)."""
    tracked: int
    """Points tracked (all the reference's corners that tracked, or those of the strongest
    ``FIRST_SHARE`` when they settled the decision)."""


LK_WINDOW, LK_LEVELS = (15, 15), 3
RANSAC_ITERS = 20
"""Iterations of the homography's RANSAC (OpenCV's default: 2000). A rotation-only decision
needs 80 % of the points within 0.4 px, so within the 1 px RANSAC threshold; at that inlier
share a 4-point sample is all inliers with p = 0.8**4 = 0.41, RANSAC stops after about ten
iterations anyway, and 20 draws miss every such sample with p = 0.59**20 = 3e-5. The cap only
shortens the search where parallax is plain, where fewer draws leave a fit no better, read as
parallax all the same.
100 (the cap before) and 20, 15 and 10 give the same windows, views and cuts over the whole
shared videos, their .devdata copies and three 7-Scenes sequences (docs/BENCHMARKS.md, fourth
pass of issue 18); 20 takes 0.6x the time of 100 per fit."""


class Reference:
    """A kept view's grey image and its corners, found once for every candidate tracked
    from it."""

    __slots__ = ("grey", "corners")

    def __init__(self, grey: np.ndarray):
        self.grey = grey
        self.corners = cv2.goodFeaturesToTrack(grey, 100, 0.01, 6)


FIRST_SHARE = 0.6
"""Share of a reference's corners (its strongest) tracked first when the caller can tell from
bounds on the median flow whether the rest is needed (``camera_motion``'s ``settled``). LK
tracks every point on its own, so the points tracked in two calls move exactly as in one."""


def median_bounds(values: np.ndarray, unknown: int) -> tuple[float, float] | None:
    """Bounds on the median (``np.median``) of ``values`` and up to ``unknown`` more values of
    any size (all, some or none of them present); None when ``unknown`` values could move it
    past every one of ``values`` (as many unknown values as known ones, or more)."""
    n = len(values)
    if unknown >= n:
        return None
    s = np.sort(values)
    return float(s[(n - unknown - 1) // 2]), float(s[(n + unknown) // 2])


def camera_motion(a: np.ndarray | Reference, b: np.ndarray,
                  parallax_needed: Callable[[float], bool] | None = None,
                  settled: Callable[[float, float], bool] | None = None) -> Motion | None:
    """Camera motion from grey image ``a`` (or a :class:`Reference` of it) to ``b`` (same
    size); None when too few points track (a cut, a blank frame, or a change too large to
    follow: treat as lots of motion). With ``parallax_needed(flow)`` False the homography is
    not fitted and ``parallax`` is NaN.

    With ``settled(lo, hi)`` (True when every median flow from ``lo`` to ``hi`` leads the
    caller to the same decision without the parallax) the strongest ``FIRST_SHARE`` of the
    corners are tracked first; when the median of all of them is bound to a settled range
    whatever the others do, the others are not tracked, and ``flow`` is the median of those
    tracked (``tracked`` counts them). Otherwise the rest are tracked and everything is as
    without ``settled``.

    The median over corners follows the camera, not a minority of moving objects, so a still
    camera watching a moving hand reads as still.
    """
    ref = a if isinstance(a, Reference) else Reference(a)
    pts = ref.corners
    if pts is None or len(pts) < MIN_TRACKED:
        return None
    first = len(pts) if settled is None else math.ceil(FIRST_SHARE * len(pts))
    nxt, status, _ = cv2.calcOpticalFlowPyrLK(ref.grey, b, pts[:first], None, winSize=LK_WINDOW, maxLevel=LK_LEVELS)
    if first < len(pts):
        ok = status[:, 0] == 1
        if ok.sum() >= MIN_TRACKED:
            known = np.linalg.norm(nxt[ok, 0] - pts[:first][ok, 0], axis=1)
            bounds = median_bounds(known, len(pts) - first)
            if bounds is not None and settled(*bounds):
                return Motion(float(np.median(known)), float("nan"), int(ok.sum()))
        rest, rest_status, _ = cv2.calcOpticalFlowPyrLK(ref.grey, b, pts[first:], None, winSize=LK_WINDOW,
                                                        maxLevel=LK_LEVELS)
        nxt, status = np.concatenate([nxt, rest]), np.concatenate([status, rest_status])
    ok = status[:, 0] == 1
    if ok.sum() < MIN_TRACKED:
        return None
    p, q = pts[ok, 0], nxt[ok, 0]
    flow = float(np.median(np.linalg.norm(q - p, axis=1)))
    if parallax_needed is not None and not parallax_needed(flow):
        return Motion(flow, float("nan"), int(ok.sum()))
    H, _ = cv2.findHomography(p, q, cv2.RANSAC, 1.0, maxIters=RANSAC_ITERS)
    if H is None:
        return Motion(flow, float("inf"), int(ok.sum()))
    residual = np.linalg.norm(cv2.perspectiveTransform(p[None], H)[0] - q, axis=1)
    return Motion(flow, float(np.percentile(residual, 80)), int(ok.sum()))


class WindowBuilder:
    """Turns one source's frames into windows (the keyframe rules are in the module docstring).

    A window is V consecutive kept views; the next window starts at the first kept view at
    least ``window_step`` frames after the previous window's first frame (with ``window_step``
    beyond a window's span, no frame before that is a candidate), except after a scene cut or a
    gap: the next window then starts at the first view kept after it, however near the window
    before (which holds no view after the cut or gap). ``min_motion`` is a
    cheap pre-gate (mean absolute difference of 32x24 grey thumbnails against the last kept
    view); a frame flagged ``discontinuity`` (a live feed that reconnected) acts like a cut.
    ``blur_history``: the blur test's recent sharpness values to start with (for a source
    resumed at a window's first frame, that window's ``Window.blur_history``).
    """

    def __init__(self, source: str, *, views: int, height: int, width: int, frame_stride: int,
                 window_step: int, min_motion: float = 0.0, scene_cut: float = 0.0, pass_index: int | str = 0,
                 scene_cut_hist: float = 0.0, min_flow: float = 0.0, min_parallax: float = 0.0,
                 rotation_flow: float = 0.0, blur_ratio: float = 0.0, blur_history: Iterable[float] = ()):
        self.source, self.views, self.height, self.width = source, views, height, width
        self.frame_stride, self.window_step = frame_stride, window_step
        self.min_motion, self.scene_cut, self.pass_index = min_motion, scene_cut, pass_index
        self.scene_cut_hist, self.min_flow, self.min_parallax = scene_cut_hist, min_flow, min_parallax
        self.rotation_flow, self.blur_ratio = rotation_flow, blur_ratio
        self.buffer: deque[Kept] = deque()  # the views kept for the windows to come
        self.last_thumb: np.ndarray | None = None  # of the last kept view
        self.last_grey: Reference | None = None  # of the last kept view
        self.last_index: int | None = None  # of the last kept view
        self.speed: float | None = None  # median flow per frame at the last candidate tracked
        self.prev_cut_stats: tuple[np.ndarray, np.ndarray] | None = None  # of the previous frame
        self.sharpness: deque[float] = deque(blur_history, maxlen=SHARPNESS_HISTORY)
        self.next_candidate = 0
        self.skipped_still = self.skipped_blur = self.skipped_rotation = 0
        self.still_run = 0  # still skips since the last kept view or restart
        self.cuts = self.discontinuities = 0
        self.unlooked: list[Frame] = []  # frames since the last one looked at, none a candidate
        self.last_looked = -1  # index of the last frame looked at
        self.lost = False  # the last frame pushed could not be decoded: the next one comes after a gap
        self.made: list[Window] = []  # windows completed, not yet handed out by push or finish

    def _restart(self, index: int) -> None:
        self.buffer.clear()
        self.last_thumb = self.last_grey = self.last_index = None
        self.next_candidate = index
        self.still_run = 0

    def _gap(self, index: int) -> None:
        """A gap before frame ``index`` (a discontinuity, or a frame lost before it): no window
        spans it, and the cut test starts afresh."""
        self.discontinuities += 1
        self.prev_cut_stats = None
        self._restart(index)

    def _cut_stats(self, seen: Glance, thumb: np.ndarray) -> tuple:
        return thumb, hs_histogram(seen.colour) if self.scene_cut_hist > 0 else None

    def _differ(self, a: tuple, b: tuple, share: float = 1.0) -> bool:
        """Whether cut statistics ``a`` and ``b`` differ by more than ``share`` of a threshold."""
        if self.scene_cut > 0 and mean_abs_difference(a[0], b[0]) > share * self.scene_cut:
            return True
        return (self.scene_cut_hist > 0
                and cv2.compareHist(a[1], b[1], cv2.HISTCMP_BHATTACHARYYA) > share * self.scene_cut_hist)

    def _is_cut(self, stats: tuple) -> bool:
        prev, self.prev_cut_stats = self.prev_cut_stats, stats
        return prev is not None and self._differ(stats, prev)

    def _take(self) -> list[Window]:
        made, self.made = self.made, []
        return made

    def _resolve_unlooked(self, stats: tuple) -> None:
        """Before the frame of cut statistics ``stats`` is tested: when it differs from the last
        frame looked at by more than ``CUT_TRIGGER`` of a threshold, look at every frame kept
        unlooked-at since, in order, with the cut test on consecutive frames and every frame
        that becomes a candidate after a cut handled as a candidate (as when every frame is
        looked at). Else they are dropped: no cut and no candidate among them."""
        unlooked, self.unlooked = self.unlooked, []
        if not unlooked or self.prev_cut_stats is None or not self._differ(stats, self.prev_cut_stats, CUT_TRIGGER):
            return
        for frame in unlooked:
            try:
                seen = glance(frame)
            except FrameLost:  # reported by its source: the frames after it come after a gap
                self._gap(frame.index + 1)
                continue
            thumb = thumbnail(seen.grey)
            if self._is_cut(self._cut_stats(seen, thumb)):
                self.cuts += 1
                self._restart(frame.index)
            if frame.index >= self.next_candidate:
                self._candidate(frame, seen, thumb)

    def finish(self) -> list[Window]:
        """At the end of the source: the frames still unlooked-at are looked at as the next
        frame would have them looked at (their cuts count); the windows completed since the last
        push, in order (none, or more than one)."""
        self._finish()
        return self._take()

    def _finish(self) -> None:
        """:meth:`finish` but for handing out the windows (before a gap too)."""
        if not self.unlooked:
            return
        last = self.unlooked.pop()
        try:
            seen = glance(last)
        except FrameLost:  # reported by its source: the frames before it as if it were not there
            self._finish()
            self._gap(last.index + 1)
            return
        thumb = thumbnail(seen.grey)
        stats = self._cut_stats(seen, thumb)
        self._resolve_unlooked(stats)
        self.last_looked = last.index
        if self._is_cut(stats):
            self.cuts += 1
            self._restart(last.index)
        if last.index >= self.next_candidate:
            self._candidate(last, seen, thumb)

    def _step(self, frame: Frame, still_run: int | None, flow: float | None, target: float) -> int:
        """Frames from skipped ``frame`` to the next candidate; ``still_run``: the still skips in
        a row, this one counted (None: not a still skip)."""
        step = 1  # try the very next frame, not a stride on
        if still_run is not None:  # a camera that stays still is tried less often
            step = 1 + still_run // STILL_BACKOFF
        if flow is not None and self.last_index is not None:
            step = max(step, frames_to_flow(flow, target, frame.index - self.last_index))
        return min(self.frame_stride, step)

    def _skip(self, frame: Frame, counter: str, flow: float | None = None, target: float = 0.0) -> None:
        setattr(self, counter, getattr(self, counter) + 1)
        if counter == "skipped_still":
            self.still_run += 1
        still_run = self.still_run if counter == "skipped_still" else None
        self.next_candidate = frame.index + self._step(frame, still_run, flow, target)

    def _settled(self, frame: Frame, lo: float, hi: float) -> bool:
        """Whether every median flow in [lo, hi] leads to the same decision without the
        parallax: a view (at least ``keyframe_rotation_flow`` and ``keyframe_min_flow``), or a
        still skip with the same next candidate."""
        if lo >= max(self.min_flow, self.rotation_flow):
            return True
        return (hi < self.min_flow and self._step(frame, self.still_run + 1, lo, self.min_flow)
                == self._step(frame, self.still_run + 1, hi, self.min_flow))

    def push(self, frame: Frame) -> list[Window]:
        """The windows ``frame`` completes, in order: none, one, or more than one (frames kept
        unlooked-at until this one may hold views of windows of their own: after a scene cut
        among them, with ``window_step`` beyond a window's span, say)."""
        if getattr(frame, "discontinuity", False) or self.lost:
            self._finish()  # the frames before the gap, as if looked at one by one
            self._gap(frame.index)
        self.lost = False
        cut_test = self.scene_cut > 0 or self.scene_cut_hist > 0
        if frame.index < self.next_candidate:
            if not cut_test:
                return self._take()  # nothing to look at
            if self.prev_cut_stats is not None and frame.index < self.last_looked + CUT_LOOK_EVERY:
                self.unlooked.append(frame)  # looked at only if the next frame looked at differs
                return self._take()
        try:
            seen = glance(frame)
        except FrameLost:  # reported by its source: the next frame comes after a gap
            self.lost = True
            return self._take()
        thumb = thumbnail(seen.grey)
        if cut_test:
            stats = self._cut_stats(seen, thumb)
            self._resolve_unlooked(stats)
            self.last_looked = frame.index
            if self._is_cut(stats):  # tested on consecutive frames, candidate or not
                self.cuts += 1
                self._restart(frame.index)
        if frame.index >= self.next_candidate:
            self._candidate(frame, seen, thumb)
        return self._take()

    def _candidate(self, frame: Frame, seen: Glance, thumb: np.ndarray) -> None:
        """Keeps ``frame`` as a view or skips it; a window it completes goes to ``made``."""
        grey = seen.grey if self.min_flow > 0 or self.blur_ratio > 0 else None
        history = ()
        if self.blur_ratio > 0:
            history = tuple(self.sharpness)
            sharp = sharpness(grey)
            self.sharpness.append(sharp)
            if len(self.sharpness) >= 5 and sharp < self.blur_ratio * statistics.median(self.sharpness):
                self._skip(frame, "skipped_blur")
                return
        if self.last_thumb is not None and mean_abs_difference(thumb, self.last_thumb) < self.min_motion:
            self._skip(frame, "skipped_still")
            return
        if self.min_flow > 0 and self.last_grey is not None and self.last_grey.grey.shape == grey.shape:
            # the parallax decides only between min_flow and rotation_flow
            gap = frame.index - self.last_index
            # the strongest corners first only where the flow expected at the last speed (within
            # a factor of 2) would settle the decision: elsewhere the second LK call only costs
            expected = None if self.speed is None else self.speed * gap
            settled = None
            if expected is None or self._settled(frame, expected / 2, expected * 2):
                settled = lambda lo, hi: self._settled(frame, lo, hi)  # noqa: E731
            motion = camera_motion(self.last_grey, grey, lambda flow: self.min_flow <= flow < self.rotation_flow,
                                   settled)
            self.speed = None if motion is None else motion.flow / gap
            if motion is not None:  # None: tracking lost, plenty of change
                if motion.flow < self.min_flow:
                    self._skip(frame, "skipped_still", motion.flow, self.min_flow)
                    return
                if motion.parallax < self.min_parallax and motion.flow < self.rotation_flow:
                    self._skip(frame, "skipped_rotation", motion.flow, self.rotation_flow)
                    return
        self.last_thumb = thumb
        self.last_grey = Reference(grey) if self.min_flow > 0 else None
        self.last_index = frame.index
        self.still_run = 0
        self.next_candidate = frame.index + self.frame_stride
        self.buffer.append(Kept(resize_view(frame, self.width, self.height), history))
        if len(self.buffer) < self.views:
            return
        views = [kept.view for kept in list(self.buffer)[: self.views]]
        first, first_history = views[0].index, self.buffer[0].blur_history
        while self.buffer and self.buffer[0].view.index < first + self.window_step:
            self.buffer.popleft()
        if not self.buffer:  # the next window's first view comes window_step after this one's, not before
            self.next_candidate = max(self.next_candidate, first + self.window_step)
        self.made.append(Window(window_id(self.source, self.pass_index, first), self.source, views, first_history))


def frames_to_flow(flow: float, target: float, frames: int) -> int:
    """Frames until a camera that moved ``flow`` pixels in ``frames`` frames reaches ``target``
    pixels at the same speed (at least 1): the next candidate worth tracking. Every candidate
    in between would be skipped at constant speed, so tracking it buys nothing."""
    if frames <= 0 or flow >= target:
        return 1
    if flow <= 0:
        return frames * 1000  # no motion yet: as far as the caller lets it
    return max(1, math.floor(frames * target / flow - frames))


class Wanted:
    """The frames a window builder will look at beyond the cut test, for its source
    (``VideoSource.frames(wanted=...)``): from the next candidate on. A source may leave the
    others undecoded where nothing else needs them (non-reference frames); the cut test then
    compares the frames either side of the gap. Bound to the builder by :func:`windows_of`;
    unbound, every frame is wanted."""

    __slots__ = ("builder",)

    def __init__(self):
        self.builder: WindowBuilder | None = None

    def __call__(self, index: int) -> bool:
        return self.builder is None or index >= self.builder.next_candidate


def window_id(source: str, pass_index: int | str, first: int) -> str:
    """``source:pass:first_frame``: stable across restarts, so a re-sent window keeps its id."""
    return f"{source}:{pass_index}:{first}"


def builder_for(source: str, cfg, *, pass_index: int | str = 0, blur_history: Iterable[float] = ()) -> WindowBuilder:
    """``blur_history``: a resumed source's, the ``Window.blur_history`` of the window it resumes at."""
    return WindowBuilder(source, views=cfg.views, height=cfg.height, width=cfg.width,
                         frame_stride=cfg.frame_stride, window_step=cfg.window_step,
                         min_motion=cfg.keyframe_min_motion, scene_cut=cfg.scene_cut_motion,
                         scene_cut_hist=cfg.scene_cut_hist, min_flow=cfg.keyframe_min_flow,
                         min_parallax=cfg.keyframe_min_parallax, rotation_flow=cfg.keyframe_rotation_flow,
                         blur_ratio=cfg.blur_ratio, pass_index=pass_index, blur_history=blur_history)


def windows_of(source, frames: Iterable[Frame], cfg, *, pass_index: int | str = 0,
               on_error: Callable[[str, str, str], None] | None = None,
               wanted: Wanted | None = None, blur_history: Iterable[float] = ()) -> Iterator[Window]:
    """Windows of one source under ``StreamerConfig`` ``cfg``. With ``on_error`` (source,
    reason, detail), a source that ends with frames but without a single window says why:
    ``too_short`` (fewer frames than one window spans) or ``no_windows`` (the keyframe gates,
    cuts or gaps left too few views in a row). ``wanted``, given to the source of ``frames``
    too, is bound to this builder (the source may then skip frames no test needs). ``blur_history``:
    for ``frames`` that resume a source at a window's first frame, that window's ``blur_history``."""
    builder = builder_for(source, cfg, pass_index=pass_index, blur_history=blur_history)
    if wanted is not None:
        wanted.builder = builder
    made = seen = 0
    last = -1
    for frame in frames:
        seen += 1
        last = frame.index
        for window in builder.push(frame):
            made += 1
            yield window
    for window in builder.finish():
        made += 1
        yield window
    if on_error is None or made or not seen:
        return  # a source without frames has said why already
    span = (cfg.views - 1) * cfg.frame_stride + 1
    if last + 1 < span:
        on_error(source, "too_short", f"{last + 1} frames; a window of {cfg.views} views "
                                      f"{cfg.frame_stride} frames apart spans {span}")
    else:
        on_error(source, "no_windows", f"{seen} frames, no window: skipped {builder.skipped_still} still, "
                                       f"{builder.skipped_blur} blurred, {builder.skipped_rotation} rotation-only; "
                                       f"{builder.cuts} cuts, {builder.discontinuities} gaps")
