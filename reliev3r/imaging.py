"""Fitting images (and their depth maps and intrinsics) to a target size.

Aspect is kept: resize so the target is covered, then crop the centre. Intrinsics follow
exactly (``reliev3r.geometry`` conventions). Shared by the streamer, the evaluator and
reconstruction, so every stage sees frames prepared the same way.

Also how a frame is turned to be shown, and its intrinsics and pose with it: the orientation a
video's display matrix or an image's Exif orientation tag asks for (:func:`display_orientation`,
:func:`image_orientation`), applied by :func:`orient`, :func:`orient_intrinsics` and
:func:`orient_pose`. And how an image folder is read: which files are its frames and in what
order (:func:`frame_files`), its intrinsics file (:func:`intrinsics_file`, else those its
dataset publishes: :func:`published_intrinsics`,
:func:`read_intrinsics`, checked by :func:`intrinsics_problem` and against the frames by
:func:`intrinsics_mismatch` and :func:`other_size`), depth maps of another camera brought to
their colour frames (:func:`depth_intrinsics_problem`, :func:`depth_in_colour_frame`), a frame's
ground-truth pose file (:func:`read_pose`, :func:`read_tracked_pose`; every ground-truth pose is
checked by :func:`pose_problem`), and images read and written as bytes
(:func:`read_image`, :func:`write_image`, :func:`encode_image`).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np


def natural_key(path: Path) -> tuple[list, str]:
    """Sort key of an image file in natural order (``frame2`` before ``frame10``): its name's
    runs of digits compared as numbers (any that ``int()`` reads), the rest as text; the name
    itself breaks ties (``7.png``, ``07.png``). One order for the streamer, reconstruct and eval."""
    name = Path(path).name
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", name))], name


IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
"""The image files a folder's frames are read from (OpenCV decodes them)."""
FRAME_SUBFOLDERS = ("rgb", "images", "color")
"""Where a dataset keeps its colour frames when its folder has none of its own (TUM RGB-D's
``rgb/``, COLMAP's ``images/``)."""


def is_frame_file(path: Path) -> bool:
    """An image (:data:`IMAGE_SUFFIXES`) that is a colour frame: not a depth map (``.depth`` in
    its name: 7-Scenes' ``frame-N.depth.png``) nor hidden (``._frame.png``, which macOS leaves
    beside every file it copies to another file system)."""
    name = Path(path).name
    return Path(path).suffix.lower() in IMAGE_SUFFIXES and ".depth" not in name and not name.startswith(".")


def frame_files(folder: Path) -> list[Path]:
    """The colour frames of an image folder in natural order (:func:`natural_key`): its files
    that are :func:`is_frame_file`, else those of its first :data:`FRAME_SUBFOLDERS` subfolder;
    [] for none. One list for the streamer, reconstruct and eval."""
    folder = Path(folder)
    own = sorted((p for p in folder.iterdir() if is_frame_file(p) and p.is_file()), key=natural_key)
    if own:
        return own
    sub = next((folder / name for name in FRAME_SUBFOLDERS if (folder / name).is_dir()), None)
    return [] if sub is None else sorted((p for p in sub.iterdir() if is_frame_file(p) and p.is_file()),
                                         key=natural_key)


def read_image(path: str | Path, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    """``cv2.imread(path, flags)`` for any path: the file's bytes decoded (turned by an Exif
    orientation as ``imread`` turns them), None where the file cannot be read or decoded.
    OpenCV's own ``imread`` crashes the process (a segmentation fault) on a path that is not
    valid UTF-8, as a camera card's or an old archive's folder names can be."""
    return read_image_and_orientation(path, flags)[0]


def read_image_and_orientation(path: str | Path, flags: int = cv2.IMREAD_COLOR) -> tuple[np.ndarray | None, int]:
    """:func:`read_image` and the file's Exif orientation (:func:`image_orientation`, which a
    colour decode turns the image by) from the same bytes, the file opened once; (None, 0) where
    it cannot be read."""
    try:
        data = np.fromfile(path, np.uint8)
    except (OSError, ValueError):
        return None, 0
    if not data.size:
        return None, 0
    return cv2.imdecode(data, flags), image_orientation(data[:ORIENTATION_HEAD].tobytes())


def encode_image(image: np.ndarray, suffix: str) -> bytes | None:
    """The bytes of ``image`` (BGR, or grey, as ``cv2.imwrite`` takes it) encoded as a file with
    ``suffix`` (``.png``, ``.jpg``) is; None where it cannot be."""
    ok, encoded = cv2.imencode(suffix, image)
    return encoded.tobytes() if ok else None


def write_image(path: str | Path, image: np.ndarray) -> bool:
    """``cv2.imwrite(path, image)`` for any path (:func:`read_image`): encoded by the file's
    suffix (:func:`encode_image`), then written; False where it cannot be."""
    encoded = encode_image(image, Path(path).suffix)
    if encoded is None:
        return False
    try:
        Path(path).write_bytes(encoded)
    except OSError:
        return False
    return True


INTRINSICS_FILES = ("camera-intrinsics.txt", "intrinsics.txt", "K.txt", "intrinsic/intrinsic_color.txt")
"""The names an image folder's intrinsics file may have (:func:`read_intrinsics`; the first
found is read), for the camera as it records its frames; the last is where ScanNet's SensReader
writes those of a scene's ``color/`` frames."""


def intrinsics_file(folder: Path) -> Path | None:
    """The intrinsics file of an image folder (:data:`INTRINSICS_FILES`), or None."""
    return next((Path(folder) / n for n in INTRINSICS_FILES if (Path(folder) / n).is_file()), None)


SCANNET_FILES = ("color", "intrinsic/intrinsic_color.txt", "intrinsic/intrinsic_depth.txt")
"""What a ScanNet scene as SensReader exports it has beside its ``depth/<N>.png`` maps and
``pose/<N>.txt`` poses: its colour frames and the intrinsics of its colour and depth cameras."""


def is_scannet_scene(folder: Path) -> bool:
    """Whether ``folder`` is a ScanNet scene as SensReader exports it (:data:`SCANNET_FILES`), whose
    depth maps are of another camera than its frames (:func:`depth_in_colour_frame`)."""
    return all((Path(folder) / name).exists() for name in SCANNET_FILES)


SEVEN_SCENES_K = np.array([[585.0, 0.0, 320.0], [0.0, 585.0, 240.0], [0.0, 0.0, 1.0]])
"""The intrinsics 7-Scenes publishes for every sequence (its 640x480 Kinect colour frames), of
the camera as it records; Microsoft's download ships them in no file."""
SEVEN_SCENES_FRAME = re.compile(r"frame-(\d+)\.color\.(?:jpg|png)")
"""How 7-Scenes names a colour frame (``frame-000000.color.png``; ``.jpg`` in some copies), its
number the group."""


def published_intrinsics(files: list[Path]) -> Callable[[int, int, int], np.ndarray | None] | None:
    """For an image folder with no intrinsics file (:func:`intrinsics_file`), where every frame
    of ``files`` is named as 7-Scenes names its frames: ``K(orientation, width, height)``, the
    intrinsics 7-Scenes publishes (:data:`SEVEN_SCENES_K`, for 640x480 as recorded) of a frame
    shown ``width`` x ``height`` after its Exif ``orientation`` (:func:`shown_intrinsics`),
    scaled where the copy was resized keeping 4:3 (pixel centres at integers); None where the
    frame as recorded is not 4:3 (not its frames: the readers' default field of view then).
    None for any other folder. The streamer, eval and reconstruct read a folder so."""
    if not files or not all(SEVEN_SCENES_FRAME.fullmatch(Path(f).name) for f in files):
        return None

    def at(orientation: int, width: int, height: int) -> np.ndarray | None:
        recorded_w, recorded_h = (height, width) if orientation & TRANSPOSE else (width, height)
        if recorded_w * 3 != recorded_h * 4:
            return None
        s = recorded_w / 640.0
        K = SEVEN_SCENES_K.copy()
        K[:2, :2] *= s
        K[:2, 2] = (K[:2, 2] + 0.5) * s - 0.5
        return shown_intrinsics(K, orientation, width, height)
    return at


PUBLISHED = "7-Scenes' published intrinsics (no intrinsics file)"
"""What names :func:`published_intrinsics` in a message."""


MAX_PRINCIPAL_OFFSET = 0.25
"""How far from a frame's centre, as a fraction of its side, the principal point of intrinsics
given for it may lie (:func:`intrinsics_mismatch`); cameras keep it within a few per cent."""


def intrinsics_mismatch(intrinsics: np.ndarray, width: int, height: int) -> str | None:
    """Why ``intrinsics`` cannot be those of a ``width`` x ``height`` frame, or None: a principal
    point further than :data:`MAX_PRINCIPAL_OFFSET` of a side from the frame's centre, as the
    intrinsics of the frames before they were resized or cropped put it (a 640x480 camera's
    beside its frames downsampled to 320x240: at their corner)."""
    cx, cy = float(intrinsics[0][2]), float(intrinsics[1][2])
    if abs(cx - (width - 1) / 2) <= MAX_PRINCIPAL_OFFSET * width and \
            abs(cy - (height - 1) / 2) <= MAX_PRINCIPAL_OFFSET * height:
        return None
    return (f"principal point ({cx:g}, {cy:g}) far from the centre of the {width}x{height} frames: intrinsics "
            f"of the frames before they were resized or cropped?")


def read_intrinsics(path: Path) -> np.ndarray:
    """3x3 intrinsics from a text file of 9 numbers (row-major), 4 (``fx fy cx cy``) or 16 (a 4x4
    whose last row and column are 0 0 0 1, the 3x3 its top-left: ScanNet's ``intrinsic_*.txt``),
    with finite, positive focal lengths and a last row of 0 0 1 (what the wire format takes);
    raises ``ValueError`` naming the file (``OSError``: unreadable)."""
    try:
        values = np.array(Path(path).read_text().split(), dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if values.size == 9:
        K = values.reshape(3, 3)
    elif values.size == 4:
        fx, fy, cx, cy = values
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
    elif values.size == 16:
        K = values.reshape(4, 4)
        if not (np.array_equal(K[3], [0.0, 0.0, 0.0, 1.0]) and np.array_equal(K[:3, 3], [0.0, 0.0, 0.0])):
            raise ValueError(f"{path}: a 4x4 intrinsics matrix must have a last row and column of 0 0 0 1 (its "
                             f"top-left 3x3 the intrinsics)")
        K = K[:3, :3]
    else:
        raise ValueError(f"{path}: expected 9, 4 or 16 numbers, got {values.size}")
    if (problem := intrinsics_problem(K)) is not None:
        raise ValueError(f"{path}: {problem}")
    return K


def intrinsics_problem(intrinsics) -> str | None:
    """What makes a 3x3 matrix no pinhole camera's intrinsics, or None: focal lengths that are not
    finite and > 0, another entry that is not finite, a last row other than 0 0 1 (what the wire
    format takes: every window would be refused downstream). An intrinsics file
    (:func:`read_intrinsics`) and intrinsics given to ``learner.api`` are checked so."""
    K = np.asarray(intrinsics, dtype=np.float64)
    if K.shape != (3, 3):
        return f"expected a 3x3 matrix, got shape {list(K.shape)}"
    if not (np.isfinite(K[0, 0]) and np.isfinite(K[1, 1]) and K[0, 0] > 0 and K[1, 1] > 0):
        return "focal lengths must be finite and > 0"
    if not np.isfinite(K).all():
        return "the intrinsics are not finite"
    if not np.array_equal(K[2], [0.0, 0.0, 1.0]):
        return f"the last row must be 0 0 1, got {' '.join(f'{v:g}' for v in K[2])}"
    return None


DEPTH_INTRINSICS_TOLERANCE = 0.05
"""How far the intrinsics of depth maps of another size than their colour frames may be from the
colour frames' scaled to the depth's size (:func:`depth_intrinsics_problem`): focal lengths
relative, the principal point as a fraction of its side. Two cameras calibrated side by side
differ a little (ScanNet's depth camera sees 1.1 % wider than its colour camera across, 1.5 %
down); intrinsics of another size or of another camera, by far more."""


def depth_intrinsics_problem(depth_K, depth_size: tuple[int, int], colour_K,
                             colour_size: tuple[int, int]) -> str | None:
    """Why ``depth_K``, of depth maps ``depth_size`` (width, height), cannot be a depth camera's
    that sees what the colour camera (``colour_K`` of frames ``colour_size``) sees, or None: a
    principal point far from the depth maps' centre (:func:`intrinsics_mismatch`), or intrinsics
    that are not the colour frames' scaled to the depth's size within
    :data:`DEPTH_INTRINSICS_TOLERANCE`."""
    if (problem := intrinsics_mismatch(depth_K, *depth_size)) is not None:
        return problem
    d, c = np.asarray(depth_K, dtype=np.float64), np.asarray(colour_K, dtype=np.float64)
    scale = (depth_size[0] / colour_size[0], depth_size[1] / colour_size[1])
    expected = [c[0, 0] * scale[0], c[1, 1] * scale[1], (c[0, 2] + 0.5) * scale[0] - 0.5,
                (c[1, 2] + 0.5) * scale[1] - 0.5]  # pixel centres at integers
    got = [d[0, 0], d[1, 1], d[0, 2], d[1, 2]]
    off = [abs(got[0] / expected[0] - 1), abs(got[1] / expected[1] - 1), abs(got[2] - expected[2]) / depth_size[0],
           abs(got[3] - expected[3]) / depth_size[1]]
    if max(off) <= DEPTH_INTRINSICS_TOLERANCE:
        return None
    return (f"not the colour frames' intrinsics ({colour_size[0]}x{colour_size[1]}) scaled to its "
            f"{depth_size[0]}x{depth_size[1]} depth maps: fx fy cx cy {' '.join(f'{v:g}' for v in got)}, scaled "
            f"{' '.join(f'{v:g}' for v in expected)} (more than {DEPTH_INTRINSICS_TOLERANCE:.0%} apart)")


def depth_in_colour_frame(depth: np.ndarray, depth_K, colour_K, width: int, height: int) -> np.ndarray:
    """A depth map [h, w] of a depth camera (``depth_K``) on the pixel grid of its colour frame
    (``width`` x ``height``, ``colour_K``), the two cameras at one centre with the same axes
    (ScanNet's SensReader exports identity extrinsics): each colour pixel takes the depth pixel
    nearest to where its ray meets the depth map (pixel centres at integers), 0 where that is
    outside it. Where ``depth_K`` is ``colour_K`` scaled (:func:`depth_intrinsics_problem`
    allows a little more), this is a nearest resize, centre-exact as :func:`fit_image`'s."""
    to_depth = np.asarray(depth_K, dtype=np.float64) @ np.linalg.inv(np.asarray(colour_K, dtype=np.float64))
    u, v = np.arange(width, dtype=np.float64)[None, :], np.arange(height, dtype=np.float64)[:, None]
    col = np.floor(to_depth[0, 0] * u + to_depth[0, 1] * v + to_depth[0, 2] + 0.5).astype(np.int64)
    row = np.floor(to_depth[1, 0] * u + to_depth[1, 1] * v + to_depth[1, 2] + 0.5).astype(np.int64)
    col, row = np.broadcast_arrays(col, row)
    inside = (col >= 0) & (col < depth.shape[1]) & (row >= 0) & (row < depth.shape[0])
    out = np.zeros((height, width), dtype=depth.dtype)
    out[inside] = depth[row[inside], col[inside]]
    return out


POSE_TOLERANCE = 1e-2
"""How far a ground-truth pose's rotation may be from orthonormal (the largest entry of
``R^T R - I``) and its last row from ``0 0 0 1`` (:func:`pose_problem`): a tracker's poses drift
from orthonormal by about 1e-4 (7-Scenes' KinectFusion poses by 3e-4); a scale, a shear or a
matrix that is no pose is off by far more."""


def pose_problem(pose: np.ndarray) -> str | None:
    """What makes a camera-to-world matrix [4, 4] no pose, or None where it is one: a rotation
    (orthonormal to :data:`POSE_TOLERANCE`, determinant > 0: not a reflection) and a
    translation, finite, over a last row of ``0 0 0 1``. Every ground-truth pose is checked so:
    a pose file's (:func:`read_pose`), the synthetic world's (``reliev3r.synthetic``)."""
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4):
        return f"expected a 4x4 camera-to-world, got shape {pose.shape}"
    if not np.isfinite(pose).all():
        return "the pose is not finite"
    if np.abs(pose[3] - (0.0, 0.0, 0.0, 1.0)).max() > POSE_TOLERANCE:
        return f"the last row must be 0 0 0 1, got {' '.join(f'{v:g}' for v in pose[3])}"
    R = pose[:3, :3]
    if (off := float(np.abs(R.T @ R - np.eye(3)).max())) > POSE_TOLERANCE:
        return f"the rotation is not a rotation (R^T R differs from the identity by {off:.3g})"
    if np.linalg.det(R) < 0:
        return "the rotation has determinant -1 (a reflection, no camera pose)"
    return None


def read_pose(path: Path) -> np.ndarray:
    """A camera-to-world pose [4, 4] (float64, as written) from a text file of 16 numbers
    (row-major), checked by :func:`pose_problem`; raises ``ValueError`` naming the file and the
    problem (``OSError``: unreadable)."""
    return _checked_pose(path, _pose_numbers(path))


def read_tracked_pose(path: Path) -> np.ndarray | None:
    """:func:`read_pose` of a tracker's pose file, or None where the tracker lost its frame: 16
    numbers that are not all finite, as ScanNet's SensReader writes ``-inf`` (``nan`` in some
    exports) for a frame without a pose. Its frame has no ground-truth pose; the file is not
    damaged."""
    pose = _pose_numbers(path)
    return _checked_pose(path, pose) if np.isfinite(pose).all() else None


def _checked_pose(path: Path, pose: np.ndarray) -> np.ndarray:
    if (problem := pose_problem(pose)) is not None:
        raise ValueError(f"{path}: {problem}")
    return pose


def _pose_numbers(path: Path) -> np.ndarray:
    """The 16 numbers of a pose file as a 4x4 (float64); ``ValueError`` naming the file where it
    holds other text or another count (``OSError``: unreadable)."""
    try:
        values = np.array(Path(path).read_text().split(), dtype=np.float64)
    except ValueError as err:  # words, or bytes that are not text
        raise ValueError(f"{path}: expected 16 numbers (a 4x4 camera-to-world), got text that is not numbers "
                         f"({err})") from None
    if values.size != 16:
        raise ValueError(f"{path}: expected 16 numbers (a 4x4 camera-to-world), got {values.size}")
    return values.reshape(4, 4)


def fit_plan(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int, int, int]:
    """(new_w, new_h, left, top): resize to new_w x new_h (one scale for both sides, so the
    target is covered) then crop at (left, top) to the target size."""
    scale = max(target_h / height, target_w / width)
    new_h, new_w = max(target_h, round(height * scale)), max(target_w, round(width * scale))
    return new_w, new_h, (new_w - target_w) // 2, (new_h - target_h) // 2


def fit_image(image: np.ndarray, target_h: int, target_w: int, *, nearest: bool = False,
              like: tuple[int, int] | None = None) -> np.ndarray:
    """Resize-and-centre-crop an [H, W(, C)] image. ``nearest`` for depth maps (no blending
    across depth edges or into invalid zeros; centre-exact, so a pixel samples the source pixel
    under its centre); area averaging otherwise.

    ``like=(height, width)``: the image is another resolution of a view of that size (a depth
    map coarser than its colour frame, say) and lands on exactly the grid the colour frame gets.
    """
    h, w = like if like is not None else image.shape[:2]
    new_w, new_h, left, top = fit_plan(h, w, target_h, target_w)
    new_size = (new_w, new_h)
    # INTER_NEAREST samples floor(x * scale), half a source pixel off the centre convention of
    # reliev3r.geometry; INTER_NEAREST_EXACT samples the pixel under the centre.
    interp = cv2.INTER_NEAREST_EXACT if nearest else (cv2.INTER_AREA if new_size[0] < image.shape[1]
                                                      else cv2.INTER_LINEAR)
    resized = cv2.resize(image, new_size, interpolation=interp)
    return np.ascontiguousarray(resized[top: top + target_h, left: left + target_w])


def fit_intrinsics(intrinsics: np.ndarray, height: int, width: int, target_h: int, target_w: int) -> np.ndarray:
    """Intrinsics [3, 3] of an image after :func:`fit_image`."""
    new_w, new_h, left, top = fit_plan(height, width, target_h, target_w)
    import torch  # here, not at the top: reading frames and intrinsics files needs no torch

    from reliev3r import geometry

    K = torch.as_tensor(np.asarray(intrinsics, dtype=np.float64))
    K = geometry.resize_intrinsics(K, new_w / width, new_h / height)
    return geometry.crop_intrinsics(K, left, top).numpy().astype(np.float32)


def rescale_matches(matches: np.ndarray, from_intrinsics: np.ndarray, to_intrinsics: np.ndarray) -> np.ndarray:
    """A window's matches [K, 7] (``reliev3r.protocol.MATCH_COLUMNS``) found on its views at one
    size, in pixels of the same views at another: each view's pixels taken through its
    ``to_intrinsics`` [V, 3, 3] times the inverse of its ``from_intrinsics`` (views fitted to
    either size by :func:`fit_image`, whose resize and crop :func:`fit_intrinsics` follows, so the
    map is exact whatever the rounding of the two plans). A copy; indices and scores kept."""
    out = np.array(matches, dtype=np.float32, copy=True)
    if not len(out):
        return out
    to = np.asarray(to_intrinsics, np.float64) @ np.linalg.inv(np.asarray(from_intrinsics, np.float64))
    for view, xy in ((out[:, 0], slice(2, 4)), (out[:, 1], slice(4, 6))):
        a = to[view.astype(np.int64)]  # [K, 3, 3]: an affine map of pixels (both last rows 0 0 1)
        pixels = out[:, xy].astype(np.float64)
        out[:, xy] = np.einsum("kab,kb->ka", a[:, :2, :2], pixels) + a[:, :2, 2]
    return out


TRANSPOSE, FLIP_ROWS, FLIP_COLUMNS = 1, 2, 4
"""Bits of an orientation (:func:`display_orientation`), applied in this order by :func:`orient`."""


def display_orientation(matrix) -> int:
    """The orientation (``TRANSPOSE | FLIP_ROWS | FLIP_COLUMNS`` bits) that shows a frame as its
    display matrix asks (FFmpeg's and ISO/IEC 14496-12's: 9 values, ``(a, b, u, c, d, v, x, y, w)``;
    a source pixel (p, q) is shown at (a p + c q, b p + d q), translated): quarter turns, mirrors
    (a front camera's) and both, each to the nearest of the eight. 0 for None (no matrix)."""
    if matrix is None:
        return 0
    a, b, _, c, d = (float(m) for m in matrix[:5])
    if abs(b) + abs(c) > abs(a) + abs(d):  # the axes swap: x' from q, y' from p
        return TRANSPOSE | (FLIP_ROWS if b < 0 else 0) | (FLIP_COLUMNS if c < 0 else 0)
    return (FLIP_ROWS if d < 0 else 0) | (FLIP_COLUMNS if a < 0 else 0)


def orient(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` (rows, columns, ...) as shown under ``orientation`` (:func:`display_orientation`);
    a view of it (the caller makes it contiguous where it must be)."""
    if orientation & TRANSPOSE:
        image = image.swapaxes(0, 1)
    if orientation & FLIP_ROWS:
        image = image[::-1]
    if orientation & FLIP_COLUMNS:
        image = image[:, ::-1]
    return image


def shown_image(image: np.ndarray, orientation: int) -> np.ndarray:
    """``image`` as shown under ``orientation`` (:func:`orient`) in an array of its own (C-contiguous,
    as what a reader keeps must be); ``image`` itself under orientation 0."""
    return np.ascontiguousarray(orient(image, orientation)) if orientation else image


def orient_intrinsics(intrinsics, orientation: int, width: int, height: int) -> np.ndarray:
    """Intrinsics [3, 3] (float64) of a ``width`` x ``height`` image shown under ``orientation``
    (:func:`orient`), from its own: a ray projects to the pixel its recorded pixel is shown at
    (pixel centres at whole coordinates, as in ``reliev3r.geometry``), in camera axes turned
    as the pixels are. A transpose swaps the axes (fx with fy, cx with cy); a flip counts its
    axis from the other end (``cy' = height - 1 - cy`` for the rows, the height once turned)."""
    K = np.array(intrinsics, dtype=np.float64)
    if orientation & TRANSPOSE:
        K = K[[1, 0, 2]][:, [1, 0, 2]]
        width, height = height, width
    if orientation & FLIP_ROWS:
        K[1] = (height - 1) * K[2] - K[1]
        K[:, 1] *= -1
    if orientation & FLIP_COLUMNS:
        K[0] = (width - 1) * K[2] - K[0]
        K[:, 0] *= -1
    return K


def mirrored(orientation: int) -> bool:
    """Whether ``orientation`` mirrors the image (Exif 2, 4, 5, 7): an odd number of its bits,
    each of which reverses one axis or swaps the two."""
    return bin(orientation & (TRANSPOSE | FLIP_ROWS | FLIP_COLUMNS)).count("1") % 2 == 1


def orient_pose(cam_to_world, orientation: int) -> np.ndarray:
    """Camera-to-world [4, 4] (float64) of the view shown under ``orientation`` (:func:`orient`),
    from the recorded camera's: its camera axes turned as :func:`orient_intrinsics` turns them
    (``X' = M X``: a transpose swaps x and y, a flip reverses the axis of its rows or columns),
    so the pose is ``cam_to_world @ [[M^T, 0], [0, 1]]``: the camera turned about its optical
    axis, its centre and viewing direction unchanged. World points then project, with the turned
    intrinsics, to where the image shows their recorded pixels. A mirrored orientation
    (:func:`mirrored`) would take a rotation of determinant -1, which is no camera pose: raises
    ``ValueError`` saying so."""
    if mirrored(orientation):
        exif = next(k for k, v in EXIF_ORIENTATIONS.items() if v == orientation)
        raise ValueError(f"mirrored (Exif orientation {exif}): a mirrored view has no camera pose (its rotation "
                         "would have determinant -1)")
    M = np.eye(3)
    if orientation & TRANSPOSE:
        M = M[[1, 0, 2]]
    if orientation & FLIP_ROWS:
        M[1] *= -1
    if orientation & FLIP_COLUMNS:
        M[0] *= -1
    turn = np.eye(4)
    turn[:3, :3] = M.T
    return np.asarray(cam_to_world, dtype=np.float64) @ turn


def recorded_size(orientation: int, width: int, height: int) -> tuple[int, int]:
    """(width, height) as recorded of a frame shown ``width`` x ``height`` after its Exif
    ``orientation`` turned it."""
    return (height, width) if orientation & TRANSPOSE else (width, height)


def other_size(file: Path | str, size: tuple[int, int], first: Path | str, first_size: tuple[int, int],
               intrinsics: Path | str) -> str | None:
    """Why the one intrinsics matrix of an image folder (``intrinsics`` names it: its file, or
    :data:`PUBLISHED`) cannot serve the frame ``file``, recorded ``size`` (width, height:
    :func:`recorded_size`), or None: another size than the first frame of the folder (``first``,
    recorded ``first_size``), the size the matrix is taken to be of. A frame resized, cropped or
    turned by an editor, whose principal point may still pass :func:`intrinsics_mismatch`. The
    streamer and eval refuse such a frame, as reconstruct does."""
    if tuple(size) == tuple(first_size):
        return None
    return (f"{file}: {size[0]}x{size[1]}, unlike {Path(first).name}'s {first_size[0]}x{first_size[1]}, so the "
            f"folder's one intrinsics matrix ({intrinsics}) cannot serve both")


def shown_intrinsics(intrinsics, orientation: int, width: int, height: int) -> np.ndarray:
    """:func:`orient_intrinsics` from the size of the image as shown (``width`` x ``height``,
    after ``orientation`` turned it), as a reader that has decoded the turned image knows it."""
    return orient_intrinsics(intrinsics, orientation, *recorded_size(orientation, width, height))


EXIF_ORIENTATIONS = {1: 0, 2: FLIP_COLUMNS, 3: FLIP_ROWS | FLIP_COLUMNS, 4: FLIP_ROWS, 5: TRANSPOSE,
                     6: TRANSPOSE | FLIP_COLUMNS, 7: TRANSPOSE | FLIP_ROWS | FLIP_COLUMNS, 8: TRANSPOSE | FLIP_ROWS}
"""An Exif orientation tag's value (how the stored image is turned to be shown) as the bits of
:func:`orient`."""
ORIENTATION_HEAD = 1 << 18
"""Bytes of an image file read for its Exif orientation (a JPEG's APP1 segment is at most 64 KiB)."""


def image_orientation(data: bytes) -> int:
    """The orientation (:func:`orient` bits) OpenCV shows an image under: its Exif
    orientation tag, in a JPEG's APP1 ``Exif`` segment or a PNG's ``eXIf`` chunk before its image
    data (OpenCV turns both when it decodes them in colour); 0 for none, another format or
    metadata that does not parse."""
    tiff = _exif_tiff(data)
    if tiff is None or len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return 0
    order = "<" if tiff[:2] == b"II" else ">"
    magic, ifd = struct.unpack_from(order + "HI", tiff, 2)
    if magic != 42 or ifd + 2 > len(tiff):
        return 0
    (entries,) = struct.unpack_from(order + "H", tiff, ifd)
    for at in range(ifd + 2, min(ifd + 2 + 12 * entries, len(tiff) - 11), 12):
        tag, kind = struct.unpack_from(order + "HH", tiff, at)
        if tag == 0x0112:  # Orientation, a SHORT
            return EXIF_ORIENTATIONS.get(struct.unpack_from(order + "H", tiff, at + 8)[0], 0) if kind == 3 else 0
    return 0


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, offset of its FF, length) of each segment of a JPEG's header that has a length
    (fill bytes and markers without one passed over), in order, up to the first start of scan
    (0xDA, yielded) or to where the markers no longer parse or the data ends. Nothing for data
    that is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2:i + 4], "big")
        yield marker, i, length
        if marker == 0xDA:
            return
        i += 2 + length


def _exif_tiff(data: bytes) -> bytes | None:
    """The Exif TIFF block of a JPEG (APP1 before its first scan) or a PNG (eXIf before IDAT)."""
    if data[:2] == b"\xff\xd8":
        for marker, i, length in jpeg_segments(data):
            if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\x00\x00":
                return data[i + 10:i + 2 + length]
        return None
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        i = 8
        while i + 8 <= len(data):
            length, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8]
            if kind == b"eXIf":
                return data[i + 8:i + 8 + length]
            if kind in (b"IDAT", b"IEND"):
                return None
            i += 12 + length
    return None


def file_orientation(file: Path) -> int:
    """:func:`image_orientation` of an image file, from its first :data:`ORIENTATION_HEAD` bytes
    (0 where it cannot be read: reading the image says why)."""
    try:
        with open(file, "rb") as f:
            return image_orientation(f.read(ORIENTATION_HEAD))
    except OSError:
        return 0
