"""``reliev3r eval``: score snapshots on a dataset with ground truth, baselines beside them.

Prints a markdown table (one row per model or baseline) and writes ``results.json`` and
``results.md`` into ``--out`` (default: ``<run.dir>/eval``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from evaluation.baselines import classical_pose_baseline, teacher_depth_baseline
from evaluation.datasets import load_windows
from evaluation.evaluate import evaluate_model, trivial_baseline
from learner import snapshot as snapshots
from reliev3r.config import PipelineConfig

COLUMNS = [("absrel_med", "AbsRel med"), ("delta_med", "δ<1.25 med"), ("absrel_lsq", "AbsRel lsq"),
           ("delta_lsq", "δ<1.25 lsq"), ("absrel_lsq_frame", "AbsRel lsq/frame"), ("ate", "ATE"),
           ("rpe_trans", "RPE t"), ("rpe_rot_deg", "RPE r°"), ("rra30", "RRA@30"), ("rta30", "RTA@30"),
           ("auc30", "AUC@30"), ("accuracy", "Acc"), ("completeness", "Comp")]


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    head = "| model | " + " | ".join(title for _, title in COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for name, values in rows.items():
        cells = [f"{values[k]:.3f}" if k in values else "–" for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resolve_snapshot(path: Path) -> Path:
    """A snapshot folder, or the newest valid one in a run folder or snapshots folder."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for folder in (path, path / "snapshots"):
        snap = snapshots.latest_snapshot(folder)
        if snap is not None:
            return snap
    raise FileNotFoundError(f"{path}: no valid snapshot there")


def main(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    snap = resolve_snapshot(Path(args.checkpoint))
    model, meta = snapshots.load_model(snap, device)
    trained = meta.get("config", {}).get("streamer", {})
    views = args.views or trained.get("views", cfg.streamer.views)
    height, width = trained.get("height", cfg.streamer.height), trained.get("width", cfg.streamer.width)
    data = args.data or cfg.evaluator.data
    windows = load_windows(data, views=views, height=height, width=width,
                           windows=args.windows or cfg.evaluator.windows, stride=cfg.evaluator.stride,
                           run_dir=cfg.run_dir, synthetic_cfg=cfg.streamer.synthetic)
    rows: dict[str, dict[str, float]] = {}
    rows[f"model step {meta['step']}"] = evaluate_model(model, windows, device, progress=True, desc="model")
    rows["baseline: constant depth + identity poses"] = trivial_baseline(windows)
    teacher = cfg.labeler.teacher
    if teacher != "none":
        rows[f"baseline: teacher depth ({teacher})"] = teacher_depth_baseline(windows, teacher, device)
    rows[f"baseline: two-view essential matrix ({cfg.labeler.matcher})"] = classical_pose_baseline(
        windows, cfg.labeler)
    table = markdown_table(rows)
    print(f"\n{data}: {len(windows)} windows of {views} views at {width}x{height}, snapshot {snap}\n")
    print(table)
    out = Path(args.out) if args.out else cfg.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"snapshot": str(snap), "step": meta["step"], "data": data, "windows": len(windows), "views": views,
         "height": height, "width": width, "rows": rows}, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'}")
    return 0
