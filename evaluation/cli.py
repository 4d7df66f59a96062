"""``reliev3r eval``: score snapshots on a dataset with ground truth, baselines beside them.

Prints a markdown table (one row per model or baseline) and writes ``results.json`` and
``results.md`` into ``--out`` (default: ``eval/`` in the snapshot's run folder, where the
``synthetic`` spec's held-out scenes are too, ``eval_world/``). Rows: the snapshot, every
``--compare`` snapshot (e.g. the fully-supervised sibling), each again with its poses fitted to
its depth and the windows' verified matches (on data with ground-truth poses), and the
baselines: constant depth with identity poses, each depth teacher alone (``--teacher``; default ``labeler.teacher`` and,
for a snapshot of a run whose teacher refresh is done, the teacher that refresh made)
and two-view essential-matrix poses from matches of ``labeler.matcher``, verified. Every model
sees the same windows, at the first snapshot's training resolution; the matches (of the classical
baseline and the fitted poses) are found on the same views at 640 pixels on the long side
(``labelers.matches.match_size``). The windows
(``streamer.views``, ``evaluator.data``, ``windows``, ``stride``, the synthetic world) and the
baselines (``labeler.teacher``, ``matcher``, ``ransac_threshold_px``) are the snapshot's run's,
from its ``config.yaml``, where the command line does not set them and no ``--config`` is given
(:func:`reliev3r.config.with_run_config`, as ``reliev3r view`` reads a run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from evaluation.baselines import classical_pose_baseline, teacher_depth_baseline, window_matches
from evaluation.datasets import load_windows, spec_problem
from evaluation.evaluate import TITLES, has_ground_truth, markdown_table, score_model_and_fitted, score_trivial
from evaluation.intervals import RESAMPLES, interval_table
from evaluation.metrics import mean_metrics
from labelers.config import teacher_kind
from learner import snapshot as snapshots
from learner.snapshot import resolve_given
from reliev3r.config import PipelineConfig, refreshed_teacher, run_folder, with_run_config

COLUMNS = ("absrel_med", "delta_med", "absrel_lsq", "delta_lsq", "absrel_lsq_frame", "delta_lsq_frame", "ate",
           "rpe_trans", "rpe_rot_deg", "rra30", "rta30", "auc30", "accuracy", "completeness")
"""The metrics of the ``reliev3r eval`` table, in order."""
FITTED = "poses fitted to its depth"
"""Suffix of a model's second row: its depth, the poses ``learner.posefit`` fits to it and the
matches the classical baseline solves (what ``reliev3r reconstruct`` writes by default)."""


def _snapshot_name(snap: Path, meta: dict, taken: dict) -> str:
    """``RUN/step-N (loss, step N)``; a snapshot from before a teacher refresh ``RUN/before-refresh/step-N``;
    one whose name is ``taken`` already (two runs of one name, the same snapshot twice) gets `` #2``, ``#3``..."""
    loss = meta.get("config", {}).get("loss", {}).get("kind", "?")
    folder = snap.parent.parent
    where = f"{folder.parent.name}/{folder.name}" if folder.name == "before-refresh" else folder.name
    name = f"{where}/{snap.name} ({loss}, step {meta['step']})"
    names = {key.partition(" ")[2] for key in taken if key.startswith(("model ", "compare "))}
    count = 1
    while (name if count == 1 else f"{name} #{count}") in names:
        count += 1
    return name if count == 1 else f"{name} #{count}"


def default_teachers(cfg: PipelineConfig, snap: Path) -> list[str]:
    """``labeler.teacher``, and the teacher a refresh wrote into the snapshot's run (the one its
    learner trained on: a snapshot from before the refresh lies in ``before-refresh``, one folder
    down, where no teacher is)."""
    refreshed = refreshed_teacher(snap.parent.parent)
    return [cfg.labeler.teacher, *([f"embedded:{refreshed}"] if refreshed else [])]


def teacher_problem(spec: str) -> str | None:
    """Why the depth teacher ``spec`` cannot be built, from its form and its file alone (no weights
    loaded), or None: a spec of no teacher's form (``labelers.config.teacher_kind``), a model
    file (``onnx:``, ``torchscript:``, ``tflite:``, ``pydnet:``) that is not there or is a folder.
    Said before any model is scored: the baselines run last."""
    try:
        kind = teacher_kind(spec)
    except ValueError as err:
        return f"{spec}: {err}"
    if kind in ("none", "oracle", "embedded", "hf"):  # no file, a folder, or a hub id
        return None
    path = Path(spec.partition(":")[2].partition("?")[0])
    if path.is_dir():
        return f"{spec}: a folder, not a file"
    return None if path.is_file() else f"{spec}: no such file"


def main(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    snap = resolve_given("--checkpoint", Path(args.checkpoint))
    run = run_folder(snap)  # the results and the held-out synthetic world are the run's
    # views, windows, data: the run's (its config.yaml) where the command line does not say
    cfg = with_run_config(cfg, run, files=getattr(args, "config", []), overrides=getattr(args, "overrides", []))
    others = []  # every path is checked before a model loads
    for path in getattr(args, "compare", None) or []:
        others.append(resolve_given("--compare", Path(path)))
    given = getattr(args, "teacher", None) or []
    for option, spec in [("--teacher", t) for t in given] or [("labeler.teacher", cfg.labeler.teacher)]:
        if problem := teacher_problem(spec):
            raise ValueError(f"{option} {problem}")
    data = args.data or cfg.evaluator.data
    if problem := spec_problem(data):
        raise ValueError(f"{'--data' if args.data else 'evaluator.data'} {problem}")
    model, meta = snapshots.load_model(snap, device)
    compare = [(other, *snapshots.load_model(other, device)) for other in others]
    views = args.views or cfg.streamer.views
    height, width = meta.get("image_size") or (cfg.streamer.height, cfg.streamer.width)
    windows = load_windows(data, views=views, height=height, width=width,
                           windows=args.windows or cfg.evaluator.windows, stride=cfg.evaluator.stride,
                           run_dir=run, synthetic_cfg=cfg.streamer.synthetic)
    has_depth, has_poses = has_ground_truth(windows)
    per_window: dict[str, list[dict[str, float]]] = {}  # the scores of each window: for the intervals
    first = f"model {_snapshot_name(snap, meta, per_window)}"
    matches = window_matches(windows, cfg.labeler, device) if has_poses else None

    def score(name: str, scored: torch.nn.Module, desc: str) -> None:  # its rows, and its fitted poses' where any
        per_window[name], fitted = score_model_and_fitted(scored, windows, device, matches, progress=True, desc=desc)
        if fitted is not None:
            per_window[f"{name}, {FITTED}"] = fitted

    score(first, model, "model")
    for other, other_model, other_meta in compare:  # named one by one: a name taken is told apart
        score(f"compare {_snapshot_name(other, other_meta, per_window)}", other_model, other.name)
    constant = "baseline: constant depth + identity poses"
    per_window[constant] = score_trivial(windows)
    rows: dict[str, dict[str, float]] = {name: mean_metrics(scores) for name, scores in per_window.items()}
    teachers = given or default_teachers(cfg, snap)
    for spec in teachers:
        if spec != "none" and has_depth:
            rows[f"baseline: teacher depth {spec} (per-frame lsq)"] = teacher_depth_baseline(windows, spec, device)
    if has_poses:
        rows[f"baseline: two-view essential matrix ({cfg.labeler.matcher})"] = classical_pose_baseline(
            windows, cfg.labeler, device, matches=matches)
    table = markdown_table(rows, COLUMNS)
    # the model over each sibling and the floor, its fitted poses over each sibling's and over its pose head's
    fitted = [name for name in per_window if name.endswith(f", {FITTED}")]
    ratios = [(first, name) for name in per_window if name != first and name not in fitted]
    if fitted:
        ratios += [(fitted[0], name) for name in fitted[1:]] + [(fitted[0], first)]
    spread, spread_numbers = interval_table(per_window, ratios, TITLES)
    spread_title = (f"95 % intervals over the {len(windows)} windows (percentile bootstrap, {RESAMPLES:,} resamples "
                    "of the windows, paired for the ratios: how much the windows chosen move a figure, not what "
                    "another training seed would)")
    match_size = list(windows[0].matching()[0].shape[1:3]) if has_poses else None
    said = f"{data}: {len(windows)} windows of {views} views at {height}x{width} (height x width)" + (
        f", their matches found at {match_size[0]}x{match_size[1]}" if has_poses else "")
    print(f"\n{said}, snapshot {snap}\n")
    print(table)
    print(f"\n{spread_title}:\n\n{spread}")
    out = Path(args.out) if args.out else run / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"snapshot": str(snap), "step": meta["step"], "compare": [str(c[0]) for c in compare], "data": data,
         "windows": [w.name for w in windows], "views": views, "height": height, "width": width,
         "match_size": match_size, "stride": cfg.evaluator.stride,
         "teachers": [t for t in teachers if t != "none"], "rows": rows,
         "intervals": spread_numbers},
        indent=2))
    (out / "results.md").write_text(f"{said}\n\n" + table + f"\n\n{spread_title}:\n\n{spread}\n")
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")
    return 0
