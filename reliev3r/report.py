"""``reliev3r report RUN [--compare RUN2 ...] [--out FILE]``: one static, self-contained HTML
page of a run's learning curves.

Every metric of the run's evaluations (``<run>/evaluations/step-*.json``, as the evaluator
writes them) over learner steps, one chart per metric as inline SVG; each ``--compare`` run on
the same charts in its own colour, and each run's poses fitted to its depth (``model_fitted_poses``,
where the data has poses) on the pose charts in a lighter shade of it; the baselines the JSON
carries (``baseline_*`` entries) as
dashed horizontal lines; a table of the newest values; and the newest snapshot's pictures
(``evaluation.pictures``) inlined as base64 PNG. No script, no network, no plotting library.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from evaluation.evaluate import TITLES
from reliev3r import durable
from reliev3r.config import run_folder

RUN_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
"""Colour of the first run (the one reported), then of each ``--compare`` run."""
FITTED_COLOURS = ("#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#9edae5")
"""Colour of each run's poses fitted to its depth (``model_fitted_poses``): its own, lighter."""
FITTED = "model_fitted_poses"
"""A record's pose metrics with the poses fitted to the snapshot's depth (the evaluator's)."""
BASELINE_COLOURS = ("#7f7f7f", "#bcbd22", "#555555")
HIGHER_IS_BETTER = ("delta", "rra", "rta", "auc")
"""Metric key prefixes where higher is better (the rest: errors, lower is better)."""


@dataclass(slots=True)
class Run:
    """A run's evaluations, oldest step first."""

    name: str
    evaluations_dir: Path
    records: list[dict] = field(default_factory=list)

    @property
    def steps(self) -> list[int]:
        return [int(r["step"]) for r in self.records]


def evaluations_dir(path: Path) -> Path:
    """A run folder (with ``evaluations/``) or an evaluations folder itself."""
    path = Path(path)
    return path / "evaluations" if (path / "evaluations").is_dir() else path


def holds_run(path: Path) -> bool:
    """Whether ``path`` is a run's folder: with ``evaluations/``, an evaluations folder itself
    (named so, or holding ``step-*.json``), or a run not evaluated yet (its ``config.yaml``, which
    ``up`` writes before anything starts, or ``snapshots/``)."""
    path = Path(path)
    return (path.name == "evaluations" or any((path / d).is_dir() for d in ("evaluations", "snapshots"))
            or (path / "config.yaml").is_file() or any(path.glob("step-*.json")))


def load_run(path: Path, name: str | None = None) -> Run:
    """The evaluation records of a run (unreadable or incomplete files are skipped).
    FileNotFoundError where ``path`` is no folder or holds no run (:func:`holds_run`): its page
    would say "no evaluations yet" of a folder that is none."""
    folder = evaluations_dir(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no evaluations folder")
    if not holds_run(path):
        raise FileNotFoundError(f"{path}: no run there (no evaluations/, step-*.json, config.yaml or snapshots/)")
    records = []
    for f in sorted(folder.glob("step-*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and _step(rec.get("step")) is not None and isinstance(rec.get("model"), dict):
            rec["step"], rec["_file"] = _step(rec["step"]), f.name
            records.append(rec)
    records.sort(key=lambda r: int(r["step"]))
    run_name = name or (folder.parent.name if folder.name == "evaluations" else folder.name)
    return Run(run_name, folder, records)


def _step(value) -> int | None:
    """A record's step as an int, or None when it is none (text, NaN, a fraction)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return int(value) if value == int(value) else None


def metric_keys(runs: list[Run]) -> list[str]:
    """Every metric any record reports, in ``TITLES`` order, unknown ones after."""
    keys = {k for run in runs for r in run.records for k, v in r["model"].items() if _finite(v)}
    return [k for k in TITLES if k in keys] + sorted(keys - set(TITLES))


def baselines(run: Run) -> dict[str, dict[str, float]]:
    """Baseline name -> metrics, from the newest record that has ``baseline_*`` entries."""
    for rec in reversed(run.records):
        found = {k.removeprefix("baseline_"): v for k, v in rec.items()
                 if k.startswith("baseline_") and isinstance(v, dict)}
        if found:
            return found
    return {}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    span = hi - lo
    raw = span / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def svg_chart(title: str, series: list[tuple[str, str, list[tuple[float, float]]]],
              lines: list[tuple[str, str, float]], *, width: int = 380, height: int = 240) -> str:
    """One line chart: series (name, colour, [(step, value)]) as polylines with points, lines
    (name, colour, value) as dashed horizontal lines across the whole step range."""
    left, right, top, bottom = 52, 10, 26, 34
    xs = [x for _, _, pts in series for x, _ in pts]
    ys = [y for _, _, pts in series for _, y in pts] + [v for _, _, v in lines]
    x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    y0, y1 = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if y1 == y0:
        y0, y1 = y0 - (abs(y0) * 0.1 or 1), y1 + (abs(y1) * 0.1 or 1)
    pad = (y1 - y0) * 0.06
    y0, y1 = y0 - pad, y1 + pad
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for t in _nice_ticks(y0, y1):
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{_fmt(t)}</text>')
    for t in _nice_ticks(x0, x1):
        x = sx(t)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" stroke="#f0f0f0"/>')
        out.append(f'<text x="{x:.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle">{t:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" font-size="10" text-anchor="middle">step</text>')
    for name, colour, value in lines:
        y = sy(value)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}" '
                   f'stroke-width="1.5" stroke-dasharray="6 4"><title>{html.escape(name)}: {_fmt(value)}</title>'
                   "</line>")
    for name, colour, pts in series:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        if len(pts) > 1:
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2.5" '
                       f'stroke-linejoin="round"/>')
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}">'
                       f'<title>{html.escape(name)} step {x:g}: {_fmt(y)}</title></circle>')
    out.append("</svg>")
    return "\n".join(out)


def _png_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _own_picture(folder: Path, name) -> bool:
    """Whether ``name`` (from a record, which may come from anyone's run) is a PNG file of
    ``folder`` itself: a bare file name, no path out of it (a page embeds what it names)."""
    if not isinstance(name, str) or Path(name).name != name or not name.endswith(".png"):
        return False
    try:  # a folder or a missing file is an OSError here
        with open(folder / name, "rb") as f:
            return f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def newest_pictures(run: Run) -> tuple[dict | None, list[Path]]:
    """The newest record that has pictures on disk, and those pictures."""
    for rec in reversed(run.records):
        stem = rec["_file"].removesuffix(".json")
        names = rec.get("pictures") or [p.name for p in sorted(run.evaluations_dir.glob(f"{stem}.*.png"))]
        paths = [run.evaluations_dir / n for n in names if _own_picture(run.evaluations_dir, n)]
        if paths:
            return rec, paths
    return None, []


CSS = """body{font-family:sans-serif;margin:16px;color:#222;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:18px 0 6px}
.charts{display:flex;flex-wrap:wrap;gap:8px}.charts svg{border:1px solid #ddd}
.legend span{display:inline-block;margin-right:14px;font-size:13px}
.legend i{display:inline-block;width:22px;height:4px;margin-right:5px;vertical-align:middle}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th:first-child,td:first-child{text-align:left}figure{display:inline-block;margin:4px 12px 4px 0}
figcaption{font-size:12px;color:#555}img{max-width:100%;image-rendering:pixelated}"""


def render(runs: list[Run]) -> str:
    """The HTML page of ``runs`` (the first is the run reported, the others its comparisons)."""
    keys = metric_keys(runs)
    base = baselines(runs[0])
    colours = {run.name: RUN_COLOURS[i % len(RUN_COLOURS)] for i, run in enumerate(runs)}
    base_colours = {b: BASELINE_COLOURS[i % len(BASELINE_COLOURS)] for i, b in enumerate(base)}
    legend = [f'<span><i style="background:{colours[r.name]}"></i>{html.escape(r.name)} '
              f'({len(r.records)} evaluations)</span>' for r in runs]
    fitted_colours = {run.name: FITTED_COLOURS[i % len(FITTED_COLOURS)] for i, run in enumerate(runs)
                      if any(isinstance(r.get(FITTED), dict) for r in run.records)}
    legend += [f'<span><i style="background:{c}"></i>{html.escape(name)}, poses fitted to its depth</span>'
               for name, c in fitted_colours.items()]
    legend += [f'<span><i style="background:repeating-linear-gradient(90deg,{c} 0 6px,transparent 6px 10px)">'
               f'</i>baseline {html.escape(b)}</span>' for b, c in base_colours.items()]
    charts = []
    for key in keys:
        series = [(run.name, colours[run.name], [(float(r["step"]), float(r["model"][key])) for r in run.records
                                                   if _finite(r["model"].get(key))]) for run in runs]
        for run in runs:
            fitted = [(float(r["step"]), float(r[FITTED][key])) for r in run.records
                      if isinstance(r.get(FITTED), dict) and _finite(r[FITTED].get(key))]
            if fitted:
                series.append((f"{run.name}, poses fitted to its depth", fitted_colours[run.name], fitted))
        lines = [(f"baseline {b}", base_colours[b], float(m[key])) for b, m in base.items() if _finite(m.get(key))]
        better = "↑" if key.startswith(HIGHER_IS_BETTER) else "↓"
        charts.append(svg_chart(f"{TITLES.get(key, key)} {better}  ({key})", series, lines))
    head = ("<tr><th>run</th><th>step</th>" + "".join(f"<th>{html.escape(TITLES.get(k, k))}</th>" for k in keys)
            + "</tr>")

    def row(name: str, step, values: dict) -> str:  # a table row: "–" where a metric is not there
        cells = "".join(f"<td>{_fmt(values[k])}</td>" if _finite(values.get(k)) else "<td>–</td>" for k in keys)
        return f"<tr><td>{html.escape(name)}</td><td>{step}</td>{cells}</tr>"

    rows = []
    for run in runs:
        if run.records:
            rec = run.records[-1]
            rows.append(row(run.name, rec["step"], rec["model"]))
            if isinstance(rec.get(FITTED), dict):
                rows.append(row(f"{run.name}, poses fitted to its depth", rec["step"], rec[FITTED]))
    rows += [row(f"baseline {b}", "–", m) for b, m in base.items()]
    pictures = []
    for run in runs:
        rec, paths = newest_pictures(run)
        if rec is not None:
            pictures.append(f"<h2>{html.escape(run.name)}: pictures of step {rec['step']}</h2>")
            pictures += [_png_tag(p, f"{run.name} step {rec['step']}: {p.name}") for p in paths]
    data = runs[0].records[-1].get("data", "") if runs[0].records else ""
    title = f"reliev3r report: {runs[0].name}"
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>",
        f"<p>evaluation data: {html.escape(str(data))} · written {time.strftime('%Y-%m-%d %H:%M:%S')} · "
        "↑ higher is better, ↓ lower is better</p>",
        f'<div class="legend">{"".join(legend)}</div>',
        "<h2>learning curves</h2>" if charts else "<p>no evaluations yet</p>",
        f'<div class="charts">{"".join(charts)}</div>',
        "<h2>newest evaluation</h2>" if rows else "", f"<table>{head}{''.join(rows)}</table>" if rows else "",
        *pictures, "</body></html>"])


def write_report(run: Path, compare: list[Path] = (), out: Path | None = None) -> Path:
    """Write the report of ``run`` (beside ``--compare`` runs) to ``out`` (default
    ``<run>/report.html``), atomically and durably (``reliev3r.durable.write``), and return its path."""
    runs = [load_run(run)]
    for path in compare:
        other = load_run(path)
        if other.name in {r.name for r in runs}:
            other.name = str(path)
        runs.append(other)
    out = Path(out) if out is not None else run_folder(run) / "report.html"  # in a run not evaluated yet too
    out.parent.mkdir(parents=True, exist_ok=True)
    durable.write(out, render(runs), tmp=out.with_name(out.name + ".tmp"))
    return out


def main(args) -> int:
    try:
        out = write_report(Path(args.run), [Path(p) for p in args.compare], Path(args.out) if args.out else None)
    except FileNotFoundError as err:
        print(f"reliev3r report: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0
