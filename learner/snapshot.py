"""Snapshots: plain, atomic, verifiable files named by step (ARCHITECTURE.md, "Rules").

Layout of one snapshot, ``<run_dir>/snapshots/step-000000050/``:

=====================  ===============================================================
``model.safetensors``  the trained weights (``FFRM.state_dict()``)
``ema.safetensors``    the EMA copy (absent when ``ema_decay`` is 0)
``target.safetensors``  the frozen depth target (``learner.self_target_step``; absent before)
``optimizer.safetensors``  AdamW state flattened to tensors ``state.<param>.<name>``; its
                       scalar structure (param groups, non-tensor state) is JSON in the
                       file's metadata under ``structure``
``trainer.safetensors``  RNG states (``rng.torch_cpu``, ``rng.torch_cuda``)
``meta.json``          format version, step, final flag, time, lr, counters, image size,
                       learner config (plain data), model size and parameter count,
                       versions, teacher names, and the SHA-256 and size of every file
=====================  ===============================================================

Writing is atomic: everything goes into a hidden temp folder, each file and the folder are
fsynced, then the folder is renamed to its final name (and the parent fsynced), so a reader
sees either a complete snapshot or none. A write the medium refuses (a full disk: ENOSPC, an
I/O error: EIO) raises ``OSError`` with its errno, the temp folder removed (its space given back)
and every snapshot written before as it was. :func:`latest_snapshot` still verifies (meta parses,
files exist with the recorded size and checksum, safetensors headers load) and skips a bad
one with a warning, so a disk fault never stops a resume. No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from learner.config import ModelConfig
from learner.model import FFRM
from reliev3r import durable

if TYPE_CHECKING:
    from learner.train import Trainer

FORMAT_VERSION = 1
NAME = re.compile(r"^step-(\d{9})$")
STALE_TMP_S = 600.0
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
"""How safetensors names the errno of a write that failed (in its error's text only)."""
log = logging.getLogger("reliev3r.learner.snapshot")


class NoSnapshot(FileNotFoundError):
    """A path given as a snapshot holds none that verifies (:func:`resolve_snapshot`)."""


class SnapshotError(RuntimeError):
    """A snapshot folder is missing, partial or corrupt; the message says what is wrong."""


REMOVED_OPTIONS: dict[str, dict[str, Any]] = {
    "model": {"predict_focal": False, "depth_param": "dense", "translation_unit": "free", "dense_grad_scale": 1.0},
    "loss": {"match_depth": "pred"},
}
"""Learner options that left the config (no measured gain on held-out data, docs/RESULTS.md),
by section, with the value each had by default. Metas written before carry them."""

ADDED_OPTIONS: dict[str, dict[str, Any]] = {
    "model": {"scale_head": False},
}
"""Learner options added since snapshots were first written, by section, with the value that a
snapshot written before each had (which may differ from today's default). Metas written before
lack them."""

FLAT_REFINE = ("weight", "depth", "solver", "steps", "scales", "shifts", "lr", "min_matches", "compile")
"""Keys of ``learner.loss.refine`` that metas written before it was a section carry flat in
``learner.loss`` as ``refine_<key>`` (``refine_weight`` 0: no refinement)."""


def snapshot_name(step: int) -> str:
    return f"step-{step:09d}"


# ---------------------------------------------------------------------- writing

def save_snapshot(trainer: "Trainer", folder: str | Path, *, final: bool = False,
                  extra_meta: dict[str, Any] | None = None) -> Path:
    """Atomically write ``trainer``'s state to ``folder/step-<step>``; return that path.
    ``extra_meta`` (e.g. ``{"teachers": ...}``) is merged into ``meta.json``. Steps launched
    and not yet read back are settled first (their step count is final only then)."""
    from reliev3r.config_base import to_dict

    trainer.settle_all()
    folder = Path(folder)
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        durable.fsync(folder.parent)  # the new folder's name on disk, or a power loss loses it with the snapshot
    name = snapshot_name(trainer.global_step)
    tmp = folder / f".tmp-{name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        files = {"model.safetensors": _cpu(trainer.model.state_dict())}
        if trainer.ema is not None:
            files["ema.safetensors"] = _cpu(trainer.ema.state_dict())
        if trainer.target is not None:
            files["target.safetensors"] = _cpu(trainer.target.state_dict())
        files["trainer.safetensors"] = {f"rng.{k}": v.cpu() for k, v in trainer.rng_state().items()}
        opt_tensors, structure = flatten_optimizer_state(trainer.optimizer.state_dict())
        for fname, tensors in files.items():
            _save_file(tensors, tmp / fname, metadata={"format_version": str(FORMAT_VERSION)})
        _save_file(opt_tensors, tmp / "optimizer.safetensors",
                   metadata={"format_version": str(FORMAT_VERSION), "structure": json.dumps(structure)})
        from learner.train import lr_at

        meta = {
            "format_version": FORMAT_VERSION,
            "step": trainer.global_step,
            "final": final,
            "time": time.time(),
            "lr": lr_at(trainer.cfg, trainer.global_step),
            "skipped_steps": trainer.skipped_steps,
            "samples_seen": trainer.samples_seen,
            "image_size": list(trainer.image_size) if trainer.image_size else None,
            "config": to_dict(trainer.cfg),
            "model": {"size": trainer.cfg.model.size, "parameters": trainer.model.num_parameters()},
            "versions": _versions(),
            "teachers": None,
            **(extra_meta or {}),
        }
        meta["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                         for p in sorted(tmp.glob("*.safetensors"))}
        (tmp / "meta.json").write_text(json.dumps(_json_safe(meta), indent=1, sort_keys=True))
        for p in tmp.iterdir():
            durable.fsync(p)
        durable.fsync(tmp)
        final_path = folder / name
        if final_path.exists():  # re-save at the same step (e.g. final right after a periodic one)
            trash = folder / f".tmp-trash-{name}-{time.time_ns()}"
            os.rename(final_path, trash)
            os.rename(tmp, final_path)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, final_path)
        durable.fsync(folder)
        return final_path
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_file(tensors: dict[str, torch.Tensor], path: Path, *, metadata: dict[str, str]) -> None:
    """``save_file``, a write the medium refused (a full disk, an I/O error) raised as the
    ``OSError`` of its errno: safetensors raises its own error and names the errno only in its text."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        if found := _OS_ERROR.search(str(err)):
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from err
        raise


def _json_safe(value: Any) -> Any:
    """``value`` as JSON can hold it: bytes decoded as UTF-8 (undecodable bytes replaced), keys
    as text, tuples as lists, anything else JSON has no type for as its ``str``. The meta holds
    what the trained windows said of their teachers, and a snapshot must not fail on it."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(_json_safe(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors, JSON-able structure) with no pickle needed."""
    tensors: dict[str, torch.Tensor] = {}
    structure: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        out = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tkey = f"state.{idx}.{key}"
                tensors[tkey] = value.detach().cpu().contiguous()
                out[key] = {"tensor": tkey}
            else:
                out[key] = {"value": value}
        structure["state"][str(idx)] = out
    return tensors, structure


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    groups = []
    for group in structure["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    state = {}
    for idx, entry in structure["state"].items():
        state[int(idx)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry.items()}
    return {"state": state, "param_groups": groups}


def with_groups_of(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A loaded ``state`` whose param groups carry ``optimizer``'s settings (weight decay,
    betas, eps, lr, fused ...) beside the snapshot's parameter indices; the per-parameter state
    (moments, step counts) is the snapshot's. ``load_state_dict`` takes the groups' settings
    from the state it is given, so without this a run resumed with another
    ``learner.weight_decay`` trained with the snapshot's, and one resumed on another device kept
    the other device's ``fused``. Handed to ``load_state_dict`` rather than set after it, so that
    torch places the state as these settings need (a fused AdamW keeps its step counts on the
    parameters' device). Groups that differ in number are left for ``load_state_dict`` to
    refuse."""
    if len(state["param_groups"]) != len(optimizer.param_groups):
        return state
    groups = [{**{k: v for k, v in mine.items() if k != "params"}, "params": saved["params"]}
              for mine, saved in zip(optimizer.param_groups, state["param_groups"])]
    return {**state, "param_groups": groups}


# ---------------------------------------------------------------------- reading

def upgrade_config(config: dict[str, Any], where: str | Path = "snapshot") -> dict[str, Any]:
    """A meta's learner config (plain data, as :func:`save_snapshot` wrote it) in this
    version's shape: options of :data:`REMOVED_OPTIONS` are dropped when they hold their
    default; a snapshot that used another value (a model of another architecture or objective)
    is refused with a :class:`SnapshotError` naming the key. Options of :data:`ADDED_OPTIONS`
    that a meta lacks get the value they had before they existed. The flat ``loss.refine_*`` keys
    become the ``loss.refine`` section (``None`` when ``refine_weight`` was 0). Returns a new
    dict."""
    out = dict(config)
    for section, removed in REMOVED_OPTIONS.items():
        if not isinstance(out.get(section), dict):
            continue
        part = out[section] = dict(out[section])
        for key, default in removed.items():
            if key in part:
                if part[key] != default:
                    raise SnapshotError(f"{where}: learner.{section}.{key}={part[key]!r} was removed from the "
                                        f"learner (only its default {default!r} is supported); this snapshot "
                                        "cannot be loaded by this version")
                del part[key]
    for section, added in ADDED_OPTIONS.items():
        if isinstance(out.get(section), dict):
            out[section] = {**added, **out[section]}
    loss = out.get("loss")
    if isinstance(loss, dict) and any(f"refine_{k}" in loss for k in FLAT_REFINE):
        flat = {k: loss.pop(f"refine_{k}") for k in FLAT_REFINE if f"refine_{k}" in loss}
        loss["refine"] = flat if flat.get("weight", 0) > 0 else None
    return out


def upgrade_meta(meta: dict[str, Any], where: str | Path = "snapshot") -> dict[str, Any]:
    """``meta`` with its ``config`` through :func:`upgrade_config` (a new dict)."""
    if not isinstance(meta.get("config"), dict):
        return meta
    return {**meta, "config": upgrade_config(meta["config"], where)}


def verify_snapshot(path: str | Path) -> dict[str, Any]:
    """Check a snapshot folder; return its meta or raise :class:`SnapshotError` saying why."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{path}: no meta.json (partial snapshot)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SnapshotError(f"{path}: meta.json does not parse: {err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or "step" not in meta:
        raise SnapshotError(f"{path}: meta.json lacks 'step' or 'files'")
    if meta.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    if "model.safetensors" not in meta["files"]:
        raise SnapshotError(f"{path}: meta lists no model.safetensors")
    for fname, info in meta["files"].items():
        fpath = path / fname
        try:
            size = fpath.stat().st_size
            if size != info.get("bytes"):
                raise SnapshotError(f"{path}: {fname} has {size} bytes, meta says {info.get('bytes')}")
            if _sha256(fpath) != info.get("sha256"):
                raise SnapshotError(f"{path}: {fname} checksum mismatch")
        except FileNotFoundError:  # missing, or removed while read (pruned by the learner)
            raise SnapshotError(f"{path}: {fname} is missing") from None
        try:
            with safe_open(str(fpath), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types on bad headers
            raise SnapshotError(f"{path}: {fname} does not load: {err}") from None
    return meta


def list_snapshots(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every snapshot-named folder, oldest first (not verified)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := NAME.match(p.name))]
    return sorted(found)


def latest_snapshot(folder: str | Path) -> Path | None:
    """The newest snapshot under ``folder`` that verifies; corrupt ones are skipped with a warning."""
    for _step, path in reversed(list_snapshots(folder)):
        try:
            verify_snapshot(path)
            return path
        except SnapshotError as err:
            log.warning("skipping unusable snapshot: %s", err)
    return None


def resolve_snapshot(path: str | Path) -> Path:
    """A snapshot folder as given, or the newest valid one in a run folder or a snapshots
    folder (what ``--checkpoint`` of ``reliev3r eval``/``reconstruct``/``export`` accepts)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for folder in (path, path / "snapshots"):
        snap = latest_snapshot(folder)
        if snap is not None:
            return snap
    raise NoSnapshot(f"{path}: no valid snapshot there (a snapshot folder, a run folder or its snapshots folder)")


def resolve_given(option: str, path: str | Path) -> Path:
    """:func:`resolve_snapshot` of a command line's ``option`` (``--checkpoint``, ``--compare``):
    its NoSnapshot names the option (``--checkpoint PATH: no valid snapshot there ...``)."""
    try:
        return resolve_snapshot(path)
    except NoSnapshot as err:
        raise NoSnapshot(f"{option} {err}") from None


def kept_steps(steps: list[int], *, keep_last: int, keep_every: int) -> set[int]:
    """The retention rule (``learner.keep_last``, ``keep_every``): of ``steps`` (ascending), the
    newest ``keep_last`` and every multiple of ``keep_every``. The snapshots are kept so
    (:func:`prune_snapshots`), and the evaluator's pictures of them (``evaluation.pictures``)."""
    return set(steps[-keep_last:]) | {step for step in steps if step % keep_every == 0}


def prune_snapshots(folder: str | Path, *, keep_last: int, keep_every: int) -> list[Path]:
    """Delete snapshots except those :func:`kept_steps` keeps; also clear temp folders left by
    crashed writers. Returns what was removed."""
    folder = Path(folder)
    snaps = list_snapshots(folder)
    keep = kept_steps([step for step, _ in snaps], keep_last=keep_last, keep_every=keep_every)
    removed = []
    for step, path in snaps:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    now = time.time()
    for tmp in folder.glob(".tmp-*") if folder.is_dir() else ():
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:
            pass
    return removed


def restore_trainer(trainer: "Trainer", path: str | Path) -> dict[str, Any]:
    """Load a snapshot into ``trainer`` (model, EMA, optimizer state, counters, RNG); return meta.
    The optimizer's settings stay this run's (:func:`with_groups_of`)."""
    path = Path(path)
    meta = upgrade_meta(verify_snapshot(path), path)
    if meta["config"]["model"] != _model_dict(trainer.cfg.model):
        raise SnapshotError(f"{path}: model config {meta['config']['model']} differs from this run's "
                            f"{_model_dict(trainer.cfg.model)}")
    device = str(trainer.device)
    trainer.model.load_state_dict(load_file(str(path / "model.safetensors"), device=device))
    if trainer.ema is not None:
        source = "ema.safetensors" if (path / "ema.safetensors").is_file() else "model.safetensors"
        trainer.ema.load_state_dict(load_file(str(path / source), device=device))
    if (path / "target.safetensors").is_file():
        trainer.freeze_target(load_file(str(path / "target.safetensors"), device=device))
    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
        structure = json.loads(f.metadata()["structure"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    trainer.optimizer.load_state_dict(with_groups_of(trainer.optimizer, unflatten_optimizer_state(tensors, structure)))
    state = load_file(str(path / "trainer.safetensors"))
    trainer.set_rng_state({k.removeprefix("rng."): v for k, v in state.items() if k.startswith("rng.")})
    trainer.global_step = int(meta["step"])
    trainer.skipped_steps = int(meta.get("skipped_steps", 0))
    trainer.samples_seen = int(meta.get("samples_seen", 0))
    if meta.get("image_size"):
        trainer.image_size = tuple(meta["image_size"])
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu", *,
               ema: bool = True) -> tuple[FFRM, dict[str, Any]]:
    """An :class:`FFRM` in eval mode from a snapshot (EMA weights when present and ``ema``)."""
    from reliev3r.config_base import build

    path = Path(path)
    meta = upgrade_meta(verify_snapshot(path), path)
    model = FFRM(build(ModelConfig, meta["config"]["model"], "learner.model"))
    fname = "ema.safetensors" if ema and (path / "ema.safetensors").is_file() else "model.safetensors"
    model.load_state_dict(load_file(str(path / fname), device="cpu"))
    return model.to(device).eval(), meta


# ---------------------------------------------------------------------- helpers

def _model_dict(cfg: ModelConfig) -> dict[str, Any]:
    from reliev3r.config_base import to_dict

    return to_dict(cfg)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _versions() -> dict[str, str]:
    try:
        package = metadata.version("reliev3r")
    except metadata.PackageNotFoundError:
        package = "unknown"
    return {"torch": torch.__version__, "reliev3r": package, "python": platform.python_version()}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


