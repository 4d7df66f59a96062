"""The feed-forward reconstruction model (FFRM): a pi3-style permutation-equivariant transformer.

Images of one window go in; per-view depth, confidence and camera pose come out in one pass.
There is no reference view and no view-index embedding: every frame gets the same token
initialisation and the only cross-view operator is global attention over all tokens of all
views, so permuting the input views permutes the outputs exactly (up to float summation order).

Layout, per frame: patch embedding (conv) -> [camera token, registers, patch tokens] with 2D
RoPE on patch positions -> ``encoder`` frame-wise blocks -> ``pairs`` x (frame-wise block,
global block) -> final norm -> heads:

* dense head: linear -> pixel shuffle to full resolution -> two 3x3 convs (with the image as
  a skip input) -> log-depth and confidence logit. The full-resolution convs follow the
  caller's autocast; the output activations (exp / tanh clamp, sigmoid) run in fp32.
* camera head (fp32): MLP on the camera token -> 6D rotation + translation -> ``cam_to_world``.
* scale head (fp32, ``ModelConfig.scale_head``): MLP on the camera token -> each view's log depth
  scale and shift; the dense head's log-depth then carries the shape only (its mean over the
  view removed) and :func:`view_depth` composes the depth.

This module knows nothing of distribution, compilation or AMP policy (ARCHITECTURE.md, "Rules").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from learner.config import SIZES, ModelConfig
from reliev3r import geometry


# ImageNet statistics: a common, harmless choice even when training from scratch.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


@dataclass
class Prediction:
    """What :class:`FFRM` returns for a batch of B windows of V views of H x W pixels.

    depth: [B, V, H, W] float32, z-depth > 0 along each camera's optical axis, in the model's
        own (arbitrary) scale.
    confidence: [B, V, H, W] float32 in (0, 2), the per-pixel weight W of the Reliev3R depth
        loss (1 at initialisation).
    cam_to_world: [B, V, 4, 4] float32, rigid camera-to-world poses (OpenCV camera axes) in the
        model's own world frame, which is defined only up to one similarity per window.
    shape, log_scale, log_shift: with ``ModelConfig.scale_head``, ``depth = view_depth(shape,
        log_scale, log_shift)``: shape [B, V, H, W] the dense head's depth with its mean
        log-depth removed, log_scale and log_shift [B, V] from the camera token; None otherwise.
    """

    depth: Tensor
    confidence: Tensor
    cam_to_world: Tensor
    shape: Tensor | None = None
    log_scale: Tensor | None = None
    log_shift: Tensor | None = None


def view_depth(shape: Tensor, log_scale: Tensor, log_shift: Tensor) -> Tensor:
    """Each view's depth from its shape, scale and shift: [B, V, H, W], [B, V], [B, V] -> [B, V, H, W].

    ``depth = exp(σ) (S − m + exp(τ) m)``, with m the view's smallest S (held constant: no
    gradient): τ = 0 is S itself, τ < 0 moves the view's depth towards its nearest point (more
    contrast), τ > 0 away from it (less), and depth stays > 0 for any σ and τ. σ and τ are the
    two numbers per view that the relative-depth loss cannot see (:mod:`learner.losses`)."""
    m = shape.detach().amin((-2, -1), keepdim=True)
    return log_scale.exp()[..., None, None] * (shape - m + log_shift.exp()[..., None, None] * m)


class Rope2D(nn.Module):
    """2D rotary position embedding: half of each head's channels rotate with the patch row,
    half with the patch column. Non-patch tokens sit at position (0, 0), i.e. unrotated."""

    def __init__(self, head_dim: int, base: float = 100.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"head_dim must be a multiple of 4 for 2D RoPE, got {head_dim}")
        quarter = head_dim // 4
        self.register_buffer("inv_freq", base ** (-torch.arange(quarter, dtype=torch.float32) / quarter),
                             persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [N, 2] (row, col) -> cos, sin [N, head_dim / 2]."""
        angles = torch.cat((positions[:, :1] * self.inv_freq, positions[:, 1:] * self.inv_freq), dim=-1)
        return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (2k, 2k+1) of x [..., N, head_dim] by the angles behind cos/sin."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # QK-norm keeps attention logits bounded when training from scratch in bf16.
        self.q_norm = nn.LayerNorm(dim // heads)
        self.k_norm = nn.LayerNorm(dim // heads)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        s, n, d = x.shape
        # QK-norm and RoPE run token-major ([S, N, heads, head_dim], the projection's own
        # layout), and attention gets head-major *views* of the result: no transposing copy
        # in the forward, and the backward assembles the QKV gradient row by row.
        q, k, v = self.qkv(x).view(s, n, 3, self.heads, d // self.heads).unbind(2)
        cos, sin = cos[:, None], sin[:, None]
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype).transpose(1, 2)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(s, n, d))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class FFRM(nn.Module):
    """pi3-style feed-forward reconstruction model; see the module docstring."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {cfg.size!r}")
        self.cfg = cfg
        size = self.size = SIZES[cfg.size]
        d, p = size.dim, cfg.patch_size
        if cfg.head_dim and d % cfg.head_dim:
            raise ValueError(f"head_dim {cfg.head_dim} does not divide size {cfg.size!r}'s dim {d}")
        heads = d // cfg.head_dim if cfg.head_dim else size.heads
        self.patch_embed = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.camera_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.register_tokens = nn.Parameter(torch.randn(1, cfg.registers, d) * 0.02)
        self.rope = Rope2D(d // heads)
        self.encoder = nn.ModuleList(Block(d, heads, size.mlp_ratio) for _ in range(size.encoder))
        self.frame_blocks = nn.ModuleList(Block(d, heads, size.mlp_ratio) for _ in range(size.pairs))
        self.global_blocks = nn.ModuleList(Block(d, heads, size.mlp_ratio) for _ in range(size.pairs))
        self.norm = nn.LayerNorm(d)
        c = size.head_channels
        self.dense_proj = nn.Linear(d, c * p * p)
        self.dense_refine = nn.Sequential(nn.Conv2d(c + 3, c, 3, padding=1), nn.GELU(), nn.Conv2d(c, 2, 3, padding=1))
        # 6D rotation + translation.
        self._cam_out = 9
        self.camera_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, self._cam_out))
        self.scale_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 2)) if cfg.scale_head else None
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self._init_weights()

    # ------------------------------------------------------------------ init
    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Depth starts ~1 and confidence at 1: tiny output weights, zero bias.
        last = self.dense_refine[-1]
        nn.init.normal_(last.weight, std=1e-3)
        nn.init.zeros_(last.bias)
        if self.scale_head is not None:  # every view's scale starts at 1, its shift at 0
            nn.init.normal_(self.scale_head[-1].weight, std=1e-3)
        # Poses start near identity with a small image-dependent spread.
        cam = self.camera_head[-1]
        nn.init.normal_(cam.weight, std=1e-3)
        with torch.no_grad():
            cam.bias.zero_()
            cam.bias[:6] = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Prediction:
        """images: [B, V, 3, H, W] RGB floats in [0, 1]; H and W multiples of ``patch_size``."""
        b, v, _, h, w = images.shape
        p = self.cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of patch_size {p}")
        gh, gw = h // p, w // p
        frames = (images.reshape(b * v, 3, h, w) - self.mean) / self.std
        tokens = self.patch_embed(frames).flatten(2).transpose(1, 2)  # [BV, gh*gw, D]
        special = 1 + self.cfg.registers
        tokens = torch.cat((self.camera_token.expand(b * v, -1, -1).to(tokens.dtype),
                            self.register_tokens.expand(b * v, -1, -1).to(tokens.dtype), tokens), dim=1)
        n = tokens.shape[1]
        cos, sin = self._rope_tables(gh, gw, special, images.device)
        cos_g, sin_g = cos.repeat(v, 1), sin.repeat(v, 1)

        x = tokens
        for block in self.encoder:
            x = block(x, cos, sin)
        for frame_block, global_block in zip(self.frame_blocks, self.global_blocks):
            x = frame_block(x, cos, sin)
            x = global_block(x.reshape(b, v * n, -1), cos_g, sin_g).reshape(b * v, n, -1)
        x = self.norm(x)

        # The dense head (projection, pixel shuffle, two 3x3 convs) works at full resolution
        # and moves more bytes than the rest of the model: it follows the caller's autocast
        # (bf16 on GPU). The output activations and the camera head run in fp32.
        out = self._dense_head(x[:, special:], frames, b * v, gh, gw)
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self._heads(out.float(), x[:, 0].float(), b, v, gh, gw)

    def _rope_tables(self, gh: int, gw: int, special: int, device) -> tuple[Tensor, Tensor]:
        rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
        # Patch positions start at 1 so that they differ from the special tokens' (0, 0).
        patch_pos = torch.stack((rows, cols), dim=-1).reshape(-1, 2).float() + 1
        pos = torch.cat((torch.zeros(special, 2, device=device), patch_pos), dim=0)
        return self.rope(pos)

    def _dense_head(self, patch_tokens: Tensor, frames: Tensor, bv: int, gh: int, gw: int) -> Tensor:
        """[BV, gh*gw, D] tokens and [BV, 3, H, W] normalised frames -> [BV, 2, H, W] log-depth and
        confidence logit (2 channels: a cheap copy out of channels-last)."""
        return self.dense_refine[2](self._dense_trunk(patch_tokens, frames, bv, gh, gw)).contiguous()

    def _dense_trunk(self, patch_tokens: Tensor, frames: Tensor, bv: int, gh: int, gw: int) -> Tensor:
        """[BV, gh*gw, D] tokens and [BV, 3, H, W] normalised frames -> [BV, c, H, W] features."""
        p, c = self.cfg.patch_size, self.size.head_channels
        patches = self.dense_proj(patch_tokens)  # [BV, gh*gw, c*p*p]
        # The pixel shuffle (channel k*p*p + i*p + j of patch (y, x) -> pixel (y*p + i, x*p + j),
        # channel k), written straight into channels-last [BV, H, W, c]: cuDNN's fast kernels
        # are NHWC, and an NCHW input would cost a layout conversion per conv and per gradient.
        feat = patches.view(bv, gh, gw, c, p, p).permute(0, 1, 4, 2, 5, 3).reshape(bv, gh * p, gw * p, c)
        # Zero channels pad the conv input (c + 3 channels) to a multiple of 8, and zero weights
        # meet them: the same sum, but cuDNN's NHWC tensor-core kernels want 8-aligned channels
        # (unaligned, it pads a copy of the input itself, forward and backward).
        extra = -(c + 3) % 8
        parts = [feat, frames.permute(0, 2, 3, 1).to(feat.dtype)]
        if extra:
            parts.append(feat.new_zeros(bv, gh * p, gw * p, extra))
        feat = torch.cat(parts, dim=-1).permute(0, 3, 1, 2)
        conv, act = self.dense_refine[0], self.dense_refine[1]
        weight = torch.cat((conv.weight, conv.weight.new_zeros(c, extra, 3, 3)), dim=1)
        return act(F.conv2d(feat, weight, conv.bias, padding=1))  # [BV, c, H, W], channels-last strides

    def _heads(self, out: Tensor, cam_token: Tensor, b: int, v: int, gh: int, gw: int) -> Prediction:
        """``out`` [BV, 2, H, W] (log-depth, confidence logit) and the camera tokens [BV, D], fp32."""
        p = self.cfg.patch_size
        h, w = gh * p, gw * p
        cam = self.camera_head(cam_token)  # [BV, 9]
        log_depth = out[:, 0]
        m = self.cfg.max_log_depth

        def clamp(x: Tensor) -> Tensor:  # soft (tanh), not hard: gradients never die at +-m
            return m * torch.tanh(x / m)

        shape = log_scale = log_shift = None
        if self.scale_head is None:
            depth = torch.exp(clamp(log_depth))
        else:
            shape = torch.exp(clamp(log_depth - log_depth.mean((-2, -1), keepdim=True)))
            log_scale, log_shift = clamp(self.scale_head(cam_token)).view(b, v, 2).unbind(-1)
            shape = shape.view(b, v, h, w)
            depth = view_depth(shape, log_scale, log_shift)
        confidence = 2 * torch.sigmoid(out[:, 1])

        rotation = geometry.rotation_6d_to_matrix(cam[:, :6])
        cam_to_world = geometry.make_pose(rotation, cam[:, 6:9])
        return Prediction(depth=depth.view(b, v, h, w), confidence=confidence.view(b, v, h, w),
                          cam_to_world=cam_to_world.view(b, v, 4, 4), shape=shape, log_scale=log_scale,
                          log_shift=log_shift)

    # ------------------------------------------------------------------ accounting
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self, h: int, w: int, v: int) -> float:
        """Analytic forward FLOPs (a multiply-add counts 2) for one window of ``v`` views of
        ``h`` x ``w`` pixels. A training step costs about 3x this (forward + backward)."""
        s, p = self.size, self.cfg.patch_size
        d, c = s.dim, s.head_channels
        gh, gw = h // p, w // p
        n = 1 + self.cfg.registers + gh * gw
        hidden = int(d * s.mlp_ratio)
        linear_per_token = 2 * (3 * d * d + d * d + 2 * d * hidden)
        blocks = s.encoder + 2 * s.pairs
        total = v * n * linear_per_token * blocks
        frame_blocks = s.encoder + s.pairs
        total += frame_blocks * v * 4 * n * n * d  # QK^T and AV within each frame
        total += s.pairs * 4 * (v * n) ** 2 * d  # over all tokens of the window
        total += v * gh * gw * 2 * 3 * p * p * d  # patch embedding
        total += v * gh * gw * 2 * d * c * p * p  # dense projection
        total += v * h * w * 2 * 9 * ((c + 3) * c + c * 2)  # refinement convs
        total += v * 2 * (d * d + d * self._cam_out)  # camera head
        if self.scale_head is not None:
            total += v * 2 * (d * d + 2 * d)
        return float(total)
