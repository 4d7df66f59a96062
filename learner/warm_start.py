"""Warm start: ``learner.init=PATH`` starts a learner that has no snapshot of its own from the
weights of another run (e.g. ``reliev3r pretrain``'s).

``PATH`` is a snapshot folder (``.../snapshots/step-NNNNNNNNN``), a run folder or its
``snapshots`` folder (the newest valid snapshot there), or one ``.safetensors`` weights file
of a snapshot (``model.safetensors`` or ``ema.safetensors``). From a folder the EMA weights
are taken when the snapshot has them. Only the weights are taken: the optimizer, the step
counter and the LR schedule start afresh, and the EMA copy starts from the same weights.
Weights are read with safetensors only (never pickle), after the snapshot's checksums are
verified. The model must be the same architecture as this run's ``learner.model`` (size,
patch size, registers, heads): otherwise :class:`InitError` names both. One exception: a
source without the scale head (``learner.model.scale_head: false``, e.g. a snapshot written
before it existed) starts a model with one; the head starts afresh (every view's scale 1 and
shift 0, relative to the source's depth with its mean log-depth removed).

A learner that resumes its own run folder ignores ``init`` (its own snapshot wins).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from learner.config import LearnerConfig, ModelConfig
from learner.snapshot import SnapshotError, _sha256, latest_snapshot, upgrade_meta, verify_snapshot

if TYPE_CHECKING:
    from learner.train import Trainer

ARCHITECTURE = ("size", "patch_size", "registers", "head_dim", "scale_head")
"""ModelConfig fields that decide the weights' layout; the others may differ from the source's."""

FRESH_HEAD = "scale_head."
"""Weights that a source without the scale head leaves at this model's initialisation."""


class InitError(ValueError):
    """``learner.init`` names no usable weights, or weights of another architecture."""


@dataclass(frozen=True)
class InitSource:
    path: str
    """The weights file that is loaded."""
    weights: str
    """``ema`` or ``model``: which copy of the source's weights."""
    sha256: str
    step: int | None
    """The source snapshot's step (None for a file without a snapshot around it)."""
    model: dict[str, Any] | None
    """The source snapshot's ``learner.model`` (None without a snapshot)."""

    def meta(self, requested: str) -> dict[str, Any]:
        """What a snapshot's ``meta.json`` records under ``init``."""
        return {"requested": requested, "path": self.path, "weights": self.weights, "sha256": self.sha256,
                "step": self.step, "model": self.model}


def resolve_init(path: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """(weights file, the snapshot's meta or None) named by ``learner.init``."""
    given = Path(path)
    if given.is_file():
        if given.suffix != ".safetensors":
            raise InitError(f"learner.init={path}: not a .safetensors weights file or a snapshot folder")
        return given, _verified(given.parent, path) if (given.parent / "meta.json").is_file() else None
    if not given.is_dir():
        raise InitError(f"learner.init={path}: no such file or folder")
    if (given / "meta.json").is_file():
        snap = given
    else:
        snap = latest_snapshot(given) or latest_snapshot(given / "snapshots")
        if snap is None:
            raise InitError(f"learner.init={path}: no valid snapshot there (give a snapshot folder, "
                            "a run folder or a .safetensors file)")
    meta = _verified(snap, path)
    name = "ema.safetensors" if "ema.safetensors" in meta["files"] else "model.safetensors"
    return snap / name, meta


def check_init(model_cfg: ModelConfig, path: str | Path) -> InitSource:
    """Check that ``learner.init=path`` fits a model of ``model_cfg`` without loading the
    weights (shapes from the file's header, this model built on the meta device)."""
    weights, meta = resolve_init(path)
    source_model = meta["config"]["model"] if meta else None
    ours = _summary(_model_dict(model_cfg))
    if source_model is not None:
        differ = [k for k in ARCHITECTURE if k in source_model and source_model[k] != getattr(model_cfg, k)
                  and not (k == "scale_head" and model_cfg.scale_head)]
        if differ:
            raise InitError(f"learner.init={path}: the source model ({_summary(source_model)}) is not this "
                            f"run's learner.model ({ours}); {', '.join(differ)} must match")
    try:
        with safe_open(str(weights), framework="pt") as f:
            theirs = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types on a bad header
        raise InitError(f"learner.init={path}: {weights} does not load: {err}") from None
    want = _shapes(model_cfg)
    if not any(k.startswith(FRESH_HEAD) for k in theirs):
        want = {k: v for k, v in want.items() if not k.startswith(FRESH_HEAD)}
    if theirs != want:
        missing, extra = sorted(set(want) - set(theirs)), sorted(set(theirs) - set(want))
        shaped = sorted(k for k in set(want) & set(theirs) if want[k] != theirs[k])
        detail = "; ".join(part for part in (
            f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
            f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "",
            f"{len(shaped)} of other shapes (e.g. {shaped[0]}: {list(theirs[shaped[0]])} vs {list(want[shaped[0]])})"
            if shaped else "") if part)
        source = _summary(source_model) if source_model else f"a weights file of {len(theirs)} tensors"
        raise InitError(f"learner.init={path}: the source model ({source}) does not fit this run's "
                        f"learner.model ({ours}): {detail}")
    return InitSource(path=str(weights), weights="ema" if weights.name.startswith("ema") else "model",
                      sha256=_sha256(weights), step=int(meta["step"]) if meta else None, model=source_model)


def init_trainer(trainer: "Trainer", path: str | Path) -> dict[str, Any]:
    """Load ``learner.init=path`` into ``trainer``'s model and EMA copy (step, optimizer and
    schedule untouched); return the ``init`` record for snapshot metas."""
    source = check_init(trainer.cfg.model, path)
    state = load_file(source.path, device=str(trainer.device))
    # check_init allowed only the scale head to be missing: it keeps its initialisation.
    trainer.model.load_state_dict(state, strict=not trainer.cfg.model.scale_head)
    if trainer.ema is not None:
        trainer.ema.load_state_dict(state, strict=not trainer.cfg.model.scale_head)
    return source.meta(str(path))


def start_problem(cfg: LearnerConfig, run_dir: str | Path, *, afresh: bool = False) -> str | None:
    """Why ``cfg.init`` cannot start a learner in ``run_dir``, or None (also when the learner
    will resume its own snapshot there and ignore it, unless ``afresh``: it starts from
    ``cfg.init`` later all the same, as after a teacher refresh that moves its snapshots aside):
    ``reliev3r up`` asks before it starts any process."""
    if not cfg.init or (not afresh and latest_snapshot(Path(run_dir) / "snapshots") is not None):
        return None
    try:
        check_init(cfg.model, cfg.init)
    except InitError as err:
        return str(err)
    return None


# ---------------------------------------------------------------------- helpers

def _verified(snap: Path, requested: str | Path) -> dict[str, Any]:
    try:
        return upgrade_meta(verify_snapshot(snap), snap)
    except SnapshotError as err:
        raise InitError(f"learner.init={requested}: {err}") from None


def _model_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in ARCHITECTURE}


def _summary(model: dict[str, Any]) -> str:
    return ", ".join(f"{k}={model[k]}" for k in ARCHITECTURE if k in model)


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    from learner.model import FFRM

    with torch.device("meta"):
        model = FFRM(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
