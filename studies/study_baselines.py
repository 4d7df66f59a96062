"""Baselines of the weak-vs-full study, on the held-out windows of labelled dataset caches (CPU).

For each cache given (one per teacher, same windows): the teacher alone (its cached labels
after a per-frame least-squares scale-and-shift to the ground truth, i.e. ``absrel_lsq_frame``:
all a monocular teacher can claim), and once for the windows: constant depth / identity poses,
and the classical two-view pose of every view pair from the SAME verified matches the learner
gets (essential matrix + cheirality, :func:`evaluation.baselines.essential_pose_errors`), scored with
the pairwise RRA/RTA/AUC@30 of :mod:`evaluation.metrics` (a pair it cannot solve counts 180°).

    .venv/bin/python -m studies.study_baselines .devdata/datasets/7scenes-...-oracle-....npz ... --out OUT.json
"""

from __future__ import annotations

import argparse
import json

import torch

from evaluation import metrics
from evaluation.baselines import essential_pose_errors, teacher_window_metrics
from evaluation.evaluate import trivial_baseline
from studies.dataset import LabelledDataset
from studies.study import format_table


def teacher_alone(data: LabelledDataset) -> dict[str, float]:
    a = data.arrays
    rows = [teacher_window_metrics(a["teacher_depth"][n], a["teacher_valid"][n], a["gt_depth"][n], data.teacher_space)
            for n in range(len(data))]
    return metrics.mean_metrics([{k: r[k] for k in ("absrel_lsq_frame", "delta_lsq_frame")} for r in rows if r])


def classical_poses(data: LabelledDataset) -> dict[str, float]:
    a = data.arrays
    rot_errs, trans_errs = [], []
    for n in range(len(data)):
        rot, trans = essential_pose_errors(data.matches_of(n), a["intrinsics"][n], a["gt_cam_to_world"][n])
        rot_errs += rot
        trans_errs += trans
    rot, trans = torch.tensor(rot_errs), torch.tensor(trans_errs)
    out = metrics.pose_auc(rot, trans)
    out["rot_err_deg"], out["trans_err_deg"] = float(rot.mean()), float(trans.mean())
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("caches", nargs="+", help="held-out dataset caches, one per teacher")
    p.add_argument("--out", default="")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, dict[str, float]] = {}
    first = LabelledDataset.load(args.caches[0])
    rows["constant depth / identity poses"] = trivial_baseline(first.windows())
    rows["essential matrix from the verified matches"] = classical_poses(first)
    for path in args.caches:
        data = LabelledDataset.load(path)
        teacher = data.meta["teacher"]
        rows[f"teacher alone: {teacher.get('name')} {teacher.get('version', '')}".strip()] = teacher_alone(data)
    print(f"{len(first)} windows, {first.stats()}")
    print(format_table(rows, keys=("absrel_med", "absrel_lsq_frame", "delta_lsq_frame", "rot_err_deg",
                                   "trans_err_deg", "rra30", "rta30", "auc30")))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
