"""``reliev3r status``: the state of a running pipeline, read from its metrics endpoints.

It reads ``<run.dir>/processes.json`` (written by the supervisor: pid, restarts, the last
error of a crashed child, metrics URL and what a stopped one is held for ("teacher refresh")
per stage, and the run's resolved ports and ZeroMQ endpoints: ``reliev3r up`` picks free ones
by default), scrapes every endpoint twice ``interval`` seconds apart (rates are the counter
deltas between the two), and prints one row per process plus the newest evaluation
from ``<run.dir>/evaluations/step-*.json``. Nothing here talks ZeroMQ: a stuck pipeline can
still be inspected.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 1.0
ORDER = ("supervisor", "streamer", "labeler", "replay", "learner", "evaluator")
EVAL_SHOWN = (("absrel_med", "AbsRel"), ("delta_med", "δ<1.25"), ("ate", "ATE"), ("rra30", "RRA@30"),
              ("auc30", "AUC@30"))


Samples = dict[str, list[tuple[dict[str, str], float]]]
"""Sample name (``reliev3r_x_total``, ``reliev3r_y_bucket`` ...) -> [(labels, value)]."""


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> Samples | None:
    """The endpoint's samples, or None when it does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return parse(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def value(samples: Samples | None, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels``; None if there are none."""
    if not samples or name not in samples:
        return None
    hits = [v for lab, v in samples[name] if all(lab.get(k) == want for k, want in labels.items())]
    return sum(hits) if hits else None


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@dataclass
class StageStatus:
    stage: str
    pid: int | None
    alive: bool
    restarts: int
    up: bool
    """The metrics endpoint answered."""
    rates: dict[str, float] = field(default_factory=dict)
    """Per-second rates over the scrape interval."""
    levels: dict[str, float] = field(default_factory=dict)
    """Current values: queue depths, learner step and loss."""
    last_error: str = ""
    """Why it last died (from its log, as the supervisor read it), if it did."""
    held: str = ""
    """What the supervisor holds it stopped for ("teacher refresh"), if it does."""


# (stage, label in the table, counter sample name, label filter)
RATES = (
    ("streamer", "frames", "reliev3r_decode_frames_total", {}),
    ("streamer", "windows", "reliev3r_windows_sent_total", {}),
    ("streamer", "resent", "reliev3r_windows_resent_total", {}),
    ("labeler", "windows", "reliev3r_labeler_windows_total", {}),
    ("labeler", "dropped", "reliev3r_labeler_dropped_total", {}),
    ("replay", "inserts", "reliev3r_replay_inserts_total", {}),
    ("replay", "samples", "reliev3r_replay_samples_total", {}),
    ("learner", "samples", "reliev3r_learner_samples_total", {}),
    ("learner", "steps", "reliev3r_learner_step", {}),
)
LEVELS = (
    ("streamer", "in flight", "reliev3r_windows_in_flight", {}),
    ("streamer", "labelers", "reliev3r_labelers_with_credit", {}),
    ("replay", "windows", "reliev3r_replay_windows", {}),
    ("replay", "waiting samples", "reliev3r_replay_waiting_requests", {"kind": "sample"}),
    ("replay", "waiting inserts", "reliev3r_replay_waiting_requests", {"kind": "insert"}),
    ("learner", "step", "reliev3r_learner_step", {}),
    ("learner", "loss", "reliev3r_learner_loss", {"term": "loss"}),
    ("learner", "steps/s", "reliev3r_learner_steps_per_second", {}),
    ("evaluator", "scored step", "reliev3r_eval_snapshot_step", {}),
)


def read_processes(run_dir: Path) -> dict[str, dict]:
    """``<run_dir>/processes.json``: each stage's process (pid, metrics endpoint, restarts, ...).
    FileNotFoundError where there is none; ValueError naming the file where it is no JSON or no
    mapping of stages to their processes."""
    path = Path(run_dir) / "processes.json"
    try:
        processes = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from None
    if not isinstance(processes, dict) or not all(isinstance(p, dict) for p in processes.values()):
        raise ValueError(f"{path}: not a mapping of stages to their processes")
    return processes


def collect(run_dir: Path, interval: float = 1.0) -> dict[str, StageStatus]:
    """Read ``processes.json`` (:func:`read_processes`) and scrape every endpoint twice,
    ``interval`` seconds apart."""
    processes = read_processes(run_dir)
    first = {stage: scrape(p["metrics"]) for stage, p in processes.items() if p.get("metrics")}
    started = time.monotonic()
    if interval > 0:
        time.sleep(interval)
    second = {stage: scrape(p["metrics"]) for stage, p in processes.items() if p.get("metrics")}
    elapsed = max(time.monotonic() - started, 1e-6)
    stages = [s for s in ORDER if s in processes] + [s for s in processes if s not in ORDER]
    out: dict[str, StageStatus] = {}
    for stage in stages:
        info = processes[stage]
        kind = stage_kind(stage)
        a, b = first.get(stage), second.get(stage)
        st = StageStatus(stage=stage, pid=info.get("pid"), alive=pid_alive(info.get("pid")),
                         restarts=int(info.get("restarts") or 0), up=b is not None,
                         last_error=str(info.get("last_error") or ""), held=str(info.get("held") or ""))
        for s, label, name, match in RATES:
            if s != kind:
                continue
            va, vb = value(a, name, **match), value(b, name, **match)
            if va is not None and vb is not None:
                st.rates[label] = max(0.0, vb - va) / elapsed  # a restart resets counters: no negative rates
        for s, label, name, match in LEVELS:
            v = value(b, name, **match)
            if s == kind and v is not None:
                st.levels[label] = v
        out[stage] = st
    return out


def stage_kind(name: str) -> str:
    """``labeler-1`` (an extra labeler of ``reliev3r up``) -> ``labeler``."""
    base, _, index = name.rpartition("-")
    return base if base and index.isdigit() else name


def latest_evaluation(run_dir: Path) -> dict | None:
    files = sorted((Path(run_dir) / "evaluations").glob("step-*.json"))
    for f in reversed(files):
        try:
            return json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # being written (should not happen: writes are atomic) or damaged
    return None


def _num(v: float) -> str:
    if v == int(v) and abs(v) < 1e9:
        return str(int(v))
    return f"{v:.4g}"


def format_table(stages: dict[str, StageStatus], evaluation: dict | None) -> str:
    rows = [("stage", "state", "pid", "restarts", "rates (/s)", "levels")]
    for st in stages.values():
        state = "up" if st.up else ("no metrics" if st.alive else f"held ({st.held})" if st.held else "down")
        rates = " ".join(f"{k} {v:.2f}" for k, v in st.rates.items())
        levels = " ".join(f"{k} {_num(v)}" for k, v in st.levels.items())
        rows.append((st.stage, state, str(st.pid or "-"), str(st.restarts), rates or "-", levels or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    lines += [f"{st.stage} last died: {st.last_error}" for st in stages.values() if st.last_error]
    if evaluation is None:
        lines.append("latest evaluation: none yet")
    else:
        model = evaluation.get("model", {})
        shown = " ".join(f"{name} {model[k]:.4g}" for k, name in EVAL_SHOWN if isinstance(model.get(k), (int, float)))
        lines.append(f"latest evaluation: step {evaluation.get('step')} on {evaluation.get('data')}: {shown}")
    return "\n".join(lines)


def main(run_dir: Path, *, interval: float = 1.0) -> int:
    """Entry of ``reliev3r status``: 0 when every process answers (or is held by the supervisor,
    as during a teacher refresh), 1 otherwise, 2 without a run or with a damaged ``processes.json``
    (said on stderr)."""
    try:
        processes = read_processes(run_dir)
    except FileNotFoundError:
        print(f"reliev3r status: no {Path(run_dir) / 'processes.json'} (is `reliev3r up` running with this run.dir?)",
              file=sys.stderr)
        return 2
    except (OSError, ValueError) as err:
        print(f"reliev3r status: {err}", file=sys.stderr)
        return 2
    stages = collect(run_dir, interval)
    print(format_table(stages, latest_evaluation(run_dir)))
    endpoints = processes.get("supervisor", {}).get("endpoints")
    if endpoints:
        print("endpoints: " + ", ".join(f"{k} {v}" for k, v in endpoints.items()))
    return 0 if all(st.up or (st.held and not st.alive) for st in stages.values()) else 1
