"""Camera geometry, in torch only, batched over any leading dimensions.

Conventions, stated once for the whole project:

* Camera axes are OpenCV's: x right, y down, z forward. Depth is z-depth (not ray length).
* Intrinsics ``K`` are 3x3 in pixels of the image they belong to.
* Pixel centres sit at integer coordinates: the top-left pixel covers [-0.5, 0.5]^2 and its
  centre is (0, 0) (OpenCV's keypoint convention). Resizing an image by ``s`` maps a
  coordinate x to ``(x + 0.5) * s - 0.5``.
* Poses are named by their frames: ``cam_to_world`` maps camera coordinates to world
  coordinates (``p_w = R p_c + t``; ``t`` is the camera centre). 4x4 homogeneous matrices.
* Shapes: ``[..., H, W]`` maps, ``[..., N, 3]`` point sets, ``[..., 3, 3]``/``[..., 4, 4]``
  matrices; leading dims broadcast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def pixel_grid(height: int, width: int, *, device=None, dtype=torch.float32) -> Tensor:
    """[H, W, 2] pixel-centre coordinates (x, y)."""
    ys = torch.arange(height, device=device, dtype=dtype)
    xs = torch.arange(width, device=device, dtype=dtype)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), dim=-1)


def intrinsics_from_fov(fov_deg: float, width: int, height: int, *, dtype=torch.float32) -> Tensor:
    """[3, 3] pinhole intrinsics with horizontal field of view ``fov_deg``, square pixels,
    principal point at the image centre."""
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]], dtype=dtype)


def resize_intrinsics(intrinsics: Tensor, scale_x: float, scale_y: float) -> Tensor:
    """Intrinsics of an image resized by (scale_x, scale_y) (pixel centres at integers)."""
    K = intrinsics.clone()
    K[..., 0, 0] = K[..., 0, 0] * scale_x
    K[..., 1, 1] = K[..., 1, 1] * scale_y
    K[..., 0, 2] = (K[..., 0, 2] + 0.5) * scale_x - 0.5
    K[..., 1, 2] = (K[..., 1, 2] + 0.5) * scale_y - 0.5
    return K


def crop_intrinsics(intrinsics: Tensor, left: float, top: float) -> Tensor:
    """Intrinsics of an image cropped so that pixel (left, top) becomes (0, 0)."""
    K = intrinsics.clone()
    K[..., 0, 2] = K[..., 0, 2] - left
    K[..., 1, 2] = K[..., 1, 2] - top
    return K


def unproject_points(uv: Tensor, depth: Tensor, intrinsics: Tensor) -> Tensor:
    """Camera-frame points [..., N, 3] of pixels ``uv`` [..., N, 2] at z-depth ``depth`` [..., N]."""
    fx, fy = intrinsics[..., 0, 0, None], intrinsics[..., 1, 1, None]
    cx, cy = intrinsics[..., 0, 2, None], intrinsics[..., 1, 2, None]
    x = (uv[..., 0] - cx) / fx
    y = (uv[..., 1] - cy) / fy
    return torch.stack((x * depth, y * depth, depth), dim=-1)


def unproject_depth(depth: Tensor, intrinsics: Tensor) -> Tensor:
    """Camera-frame point map [..., H, W, 3] of a depth map [..., H, W]."""
    h, w = depth.shape[-2:]
    uv = pixel_grid(h, w, device=depth.device, dtype=depth.dtype).reshape(-1, 2)
    pts = unproject_points(uv.expand(*depth.shape[:-2], h * w, 2), depth.flatten(-2), intrinsics)
    return pts.reshape(*depth.shape, 3)


def project(points_cam: Tensor, intrinsics: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Pixels [..., N, 2] and z-depth [..., N] of camera-frame points [..., N, 3].
    Points at or behind the camera get their z clamped to ``eps`` (check ``z > 0``)."""
    z = points_cam[..., 2]
    zc = z.clamp(min=eps)
    u = intrinsics[..., 0, 0, None] * points_cam[..., 0] / zc + intrinsics[..., 0, 2, None]
    v = intrinsics[..., 1, 1, None] * points_cam[..., 1] / zc + intrinsics[..., 1, 2, None]
    return torch.stack((u, v), dim=-1), z


def transform_points(transform: Tensor, points: Tensor) -> Tensor:
    """Apply 4x4 ``transform`` [..., 4, 4] to points [..., N, 3]."""
    return points @ transform[..., :3, :3].transpose(-1, -2) + transform[..., None, :3, 3]


def invert_pose(pose: Tensor) -> Tensor:
    """Inverse of a rigid (or similarity-free) 4x4 transform, e.g. cam_to_world -> world_to_cam."""
    R = pose[..., :3, :3]
    t = pose[..., :3, 3:]
    out = torch.zeros_like(pose)
    out[..., :3, :3] = R.transpose(-1, -2)
    out[..., :3, 3:] = -R.transpose(-1, -2) @ t
    out[..., 3, 3] = 1
    return out


def make_pose(rotation: Tensor, translation: Tensor) -> Tensor:
    """4x4 [..., 4, 4] from rotation [..., 3, 3] and translation [..., 3]."""
    pose = torch.zeros(*rotation.shape[:-2], 4, 4, dtype=rotation.dtype, device=rotation.device)
    pose[..., :3, :3] = rotation
    pose[..., :3, 3] = translation
    pose[..., 3, 3] = 1
    return pose


def relative_pose(cam_to_world_i: Tensor, cam_to_world_j: Tensor) -> Tensor:
    """Pose of camera j in the frame of camera i: ``cam_j_to_cam_i``."""
    return invert_pose(cam_to_world_i) @ cam_to_world_j


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None) -> Tensor:
    """cam_to_world [..., 4, 4] of a camera at ``eye`` looking at ``target`` (OpenCV axes:
    the image's y axis points along -``up``). ``up`` is the world's up, default +z."""
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device).expand_as(eye)
    z = F.normalize(target - eye, dim=-1)
    x = F.normalize(torch.cross(-up, z, dim=-1), dim=-1)  # right = down x forward
    y = torch.cross(z, x, dim=-1)
    return make_pose(torch.stack((x, y, z), dim=-1), eye)


def rotation_6d_to_matrix(d6: Tensor) -> Tensor:
    """Rotation [..., 3, 3] from the continuous 6D representation (Zhou et al. 2019):
    the first two columns, Gram-Schmidt orthonormalised."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = F.normalize(a1, dim=-1)
    b2 = F.normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1, dim=-1)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


def axis_angle_to_matrix(axis_angle: Tensor) -> Tensor:
    """Rodrigues: rotation [..., 3, 3] from axis-angle vectors ω [..., 3] (radians), written as
    I + sinc θ [ω]× + ½ sinc²(θ/2) [ω]×² (θ = |ω|): no division by θ, so value and gradient are
    smooth at ω = 0 (the exponential map that optimisers step through)."""
    theta = ((axis_angle * axis_angle).sum(-1) + 1e-30).sqrt()[..., None, None]
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack((zero, -z, y, z, zero, -x, -y, x, zero), -1).unflatten(-1, (3, 3))
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + torch.sinc(theta / math.pi) * skew + 0.5 * torch.sinc(theta / (2 * math.pi)) ** 2 * (skew @ skew)


def rotation_angle_deg(rotation: Tensor) -> Tensor:
    """Geodesic angle of rotation matrices [..., 3, 3], in degrees. atan2 of sine and cosine
    keeps small angles accurate, where acos of the trace loses half the digits."""
    trace = rotation[..., 0, 0] + rotation[..., 1, 1] + rotation[..., 2, 2]
    skew = torch.stack((rotation[..., 2, 1] - rotation[..., 1, 2], rotation[..., 0, 2] - rotation[..., 2, 0],
                        rotation[..., 1, 0] - rotation[..., 0, 1]), -1)
    return torch.rad2deg(torch.atan2(0.5 * skew.norm(dim=-1), 0.5 * (trace - 1)))


def angle_between_deg(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Angle between vectors [..., 3], in degrees (90 where either is zero-length: no direction)."""
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=eps)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


def sample_bilinear(values: Tensor, uv: Tensor) -> Tensor:
    """Sample maps [..., C, H, W] (or [..., H, W]) at pixels uv [..., N, 2] -> [..., N, C]
    (or [..., N]). Border values outside the image; differentiable in ``values``."""
    squeeze = values.dim() == uv.dim()  # [..., H, W] with uv [..., N, 2]
    if squeeze:
        values = values.unsqueeze(-3)
    lead = values.shape[:-3]
    c, h, w = values.shape[-3:]
    flat = values.reshape(-1, c, h, w)
    grid = uv.reshape(-1, 1, uv.shape[-2], 2)
    # align_corners=True puts -1 and +1 on the centres of the border pixels: our convention.
    norm = torch.stack((2 * grid[..., 0] / max(w - 1, 1) - 1, 2 * grid[..., 1] / max(h - 1, 1) - 1), -1)
    out = F.grid_sample(flat, norm.to(flat.dtype), mode="bilinear", padding_mode="border", align_corners=True)
    out = out[:, :, 0].transpose(1, 2).reshape(*lead, uv.shape[-2], c)
    return out[..., 0] if squeeze else out


def umeyama(source: Tensor, target: Tensor, *, with_scale: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Least-squares similarity (s, R, t) with ``target ~ s * R @ source + t``.

    ``source``, ``target``: [..., N, 3] (N >= 3, not all collinear). Returns scale [...],
    rotation [..., 3, 3], translation [..., 3]. Umeyama (1991), with reflection guard.
    """
    mu_s, mu_t = source.mean(-2), target.mean(-2)
    xs, xt = source - mu_s[..., None, :], target - mu_t[..., None, :]
    n = source.shape[-2]
    cov = xt.transpose(-1, -2) @ xs / n
    U, S, Vh = torch.linalg.svd(cov)
    d = torch.sign(torch.linalg.det(U @ Vh))
    D = torch.ones_like(S)
    D[..., -1] = d
    R = U @ torch.diag_embed(D) @ Vh
    var_s = (xs ** 2).sum((-1, -2)) / n
    if with_scale:
        scale = (S * D).sum(-1) / var_s.clamp(min=1e-12)
    else:
        scale = torch.ones_like(var_s)
    t = mu_t - scale[..., None] * (R @ mu_s[..., None])[..., 0]
    return scale, R, t
