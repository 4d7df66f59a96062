"""Tables of a study sweep: final held-out metrics of each run (``studies.study`` output folders),
the trivial baseline, optional extra baseline rows (``studies.study_baselines --out`` JSON), and the
ratio of each weak run's metric to the fully-supervised sibling's.

    .venv/bin/python -m studies.study_report RESULTS_DIR --prefix k_ --supervised k_supervised \\
        [--baselines baselines.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from studies.study import format_table


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("folder")
    p.add_argument("--prefix", default="")
    p.add_argument("--supervised", default="")
    p.add_argument("--baselines", default="")
    args = p.parse_args()
    rows: dict[str, dict[str, float]] = {}
    info = []
    baseline = None
    for run in sorted(Path(args.folder).glob(f"{args.prefix}*/curve.json")):
        doc = json.loads(run.read_text())
        last = doc["curve"][-1]
        rows[run.parent.name] = last["eval"]
        baseline = baseline or doc["baseline"]
        info.append(f"{run.parent.name}: {last['step']} steps, {last['seconds']:.0f} s, curve "
                    + ", ".join(f"{r['step']}: absrel_med {r['eval']['absrel_med']:.3f}"
                                f" rot {r['eval']['rot_err_deg']:.1f} trans {r['eval']['trans_err_deg']:.1f}"
                                for r in doc["curve"]))
    table = {"constant depth / identity poses": baseline or {}}
    if args.baselines:
        table.update(json.loads(Path(args.baselines).read_text()))
    table.update(rows)
    print(format_table(table))
    print()
    print("\n".join(info))
    if args.supervised in rows:
        sup = rows[args.supervised]
        print(f"\nratio weak / supervised ({args.supervised}; AbsRel: lower is better, AUC: higher is better)")
        for name, r in rows.items():
            if name != args.supervised:
                print(f"{name}: absrel_med x{r['absrel_med'] / sup['absrel_med']:.2f}, "
                      f"absrel_lsq x{r['absrel_lsq'] / sup['absrel_lsq']:.2f}, "
                      f"auc30 x{r['auc30'] / max(sup['auc30'], 1e-9):.2f} ({r['auc30']:.3f} vs {sup['auc30']:.3f})")
    if baseline:
        print("\nratio to the trivial baseline (target <= 0.5): "
              + "; ".join(f"{n}: absrel_med {r['absrel_med'] / baseline['absrel_med']:.2f}, rot "
                          f"{r['rot_err_deg'] / baseline['rot_err_deg']:.2f}, trans "
                          f"{r['trans_err_deg'] / baseline['trans_err_deg']:.2f}"
                          for n, r in rows.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
