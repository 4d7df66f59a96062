"""The small images the streamer's cut and keyframe tests look at (``streamer.windows``),
made once per frame: from a video frame's decoder planes without converting the frame to RGB,
or from an RGB image. Neither depends on the source's resolution beyond one downscale."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

from reliev3r.imaging import orient

MOTION_WIDTH = 160
"""Width of the grey images the keyframe gate tracks points on (flows are in these pixels)."""


COLOUR_SIZE = (64, 48)
"""Width, height of the colour image the hue-saturation histogram is taken of."""


def shrink(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Downscale to ``size`` (width, height), close to area averaging (0.3-1.6 grey levels
    from OpenCV's ``INTER_AREA`` on the shared videos) at a fraction of its cost: halve while
    the image is at least twice the size (bilinear at a factor of exactly 2 is the 2x2 mean),
    then one bilinear step of less than 2x. OpenCV's area resize takes 1.8 ms for one
    1296x720 grey image to 160 wide at that non-integer factor, this about 0.07 ms."""
    w, h = size
    while image.shape[1] >= 2 * w and image.shape[0] >= 2 * h:
        image = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2), interpolation=cv2.INTER_LINEAR)
    if image.shape[1] == w and image.shape[0] == h:
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def motion_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) of the grey image the keyframe gate tracks points on."""
    return MOTION_WIDTH, max(16, round(height * MOTION_WIDTH / width))


@dataclass(slots=True)
class Glance:
    """What the cut and keyframe tests look at, made once per frame."""

    grey: np.ndarray
    """uint8 [h, MOTION_WIDTH] grey (BT.601 luma, full range) of the whole frame."""
    colour: np.ndarray
    """uint8 [48, 64, 3] RGB of the whole frame (aspect not kept)."""


def glance_of_rgb(rgb: np.ndarray) -> Glance:
    small = shrink(rgb, motion_size(rgb.shape[1], rgb.shape[0]))
    return Glance(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), shrink(small, COLOUR_SIZE))


PLANAR_YUV = {"yuv420p": False, "yuv422p": False, "yuv444p": False, "yuvj420p": True, "yuvj422p": True,
              "yuvj444p": True, "yuv420p10le": False, "yuv422p10le": False, "yuv444p10le": False,
              "yuva444p10le": False}
"""Planar YUV formats the glance reads straight from the planes (True: full range): 8-bit, and
10-bit in 16-bit samples (HEVC Main 10 from phones, ProRes, DNxHR HQX; ProRes 4444's alpha plane
is not looked at)."""
SEMI_PLANAR = {"nv12": 0, "p010le": 6}
"""YUV formats with the chroma interleaved in one plane (what a GPU decoder hands back): 8-bit,
and 10-bit in the high bits of 16-bit samples (the value's shift)."""
_LIMITED_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255.0 / 219.0), 0, 255).astype(np.uint8)
"""Limited-range luma (16-235) to full-range grey: BT.601 grey of the decoded RGB is this map
of the luma (the chroma terms cancel in R, G, B weighted 0.299, 0.587, 0.114)."""


def _plane(vframe, i: int, samples: int = 1) -> np.ndarray:
    """Plane ``i`` as rows of its samples (uint8, or uint16 for a format of more than 8 bits);
    ``samples`` a pixel (2: NV12's and P010's interleaved chroma)."""
    plane = vframe.planes[i]
    dtype = np.uint16 if vframe.format.components[0].bits > 8 else np.uint8
    rows, stride = plane.height, plane.line_size // np.dtype(dtype).itemsize
    return np.frombuffer(plane, dtype, count=rows * stride).reshape(rows, stride)[:, :plane.width * samples]


def _to_8_bits(image: np.ndarray, bits: int, shift: int = 0) -> np.ndarray:
    """uint8 of ``bits``-bit samples (held ``shift`` bits up in uint16), rounded: what a
    conversion to 8 bits gives (10-bit 4 * v maps to v)."""
    if image.dtype == np.uint8:
        return image
    drop = bits - 8 + shift
    return np.minimum((image.astype(np.uint32) + (1 << (drop - 1))) >> drop, 255).astype(np.uint8)


def glance_of_video_frame(vframe, orientation: int = 0) -> Glance | None:
    """The glance of a PyAV frame in planar YUV (:data:`PLANAR_YUV`) or with interleaved chroma
    (:data:`SEMI_PLANAR`), from its planes (no RGB conversion of the whole frame), shown under
    ``orientation`` (``reliev3r.imaging.display_orientation``). Samples of more than 8 bits are shrunk first,
    then rounded to 8 bits. None for other pixel formats."""
    name = vframe.format.name
    if name not in PLANAR_YUV and name not in SEMI_PLANAR:
        return None
    full_range = PLANAR_YUV.get(name, False) or int(getattr(vframe, "color_range", 0) or 0) == 2  # AVCOL_RANGE_JPEG
    if name in SEMI_PLANAR:  # the chroma interleaved in one plane of half the luma's size
        y, uv = _plane(vframe, 0), _plane(vframe, 1, samples=2)
        u, v = uv[:, 0::2], uv[:, 1::2]
    else:
        y, u, v = (_plane(vframe, i) for i in range(3))
    if orientation:
        y, u, v = (np.ascontiguousarray(orient(p, orientation)) for p in (y, u, v))
    depth = functools.partial(_to_8_bits, bits=vframe.format.components[0].bits, shift=SEMI_PLANAR.get(name, 0))
    h, w = y.shape
    luma = shrink(y, motion_size(w, h))
    cw, ch = COLOUR_SIZE
    small = [shrink(luma, (cw, ch)), shrink(u, (cw // 2, ch // 2)), shrink(v, (cw // 2, ch // 2))]
    luma, small = depth(luma), [depth(p) for p in small]
    grey = luma if full_range else cv2.LUT(luma, _LIMITED_TO_FULL)
    i420 = np.concatenate([small[0], small[1].reshape(ch // 4, cw), small[2].reshape(ch // 4, cw)])
    colour = cv2.cvtColor(i420, cv2.COLOR_YUV2RGB_I420)
    return Glance(np.ascontiguousarray(grey), colour)
