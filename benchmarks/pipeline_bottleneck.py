"""Whole-pipeline throughput (streamer -> labelers -> replay -> learner) and its bottleneck.

Runs the real pipeline (``python -m reliev3r.cli up``, so no installed ``reliev3r`` entry
point is needed) with the given ``--config`` files and ``key=value`` overrides, scrapes every
stage's Prometheus endpoint (``<run.dir>/processes.json``) every ``--interval`` seconds, and
reports rates over a steady window: ``--warmup`` seconds after the learner's first step, then
``--measure`` seconds (or until ``--max-steps`` ends the run). Then it stops the pipeline.

    # 2 GPUs: labelers on cuda:0 and cuda:1 (labeler.device=cuda), learner on cuda:0
    python benchmarks/pipeline_bottleneck.py --out /tmp/pb --warmup 60 --measure 150 --isolated \\
        labeler.workers=2 labeler.device=cuda learner.device=cuda learner.model.size=base \\
        learner.batch_size=16 streamer.views=8 streamer.height=224 streamer.width=224
    # CPU check: the demo config with two labelers
    python benchmarks/pipeline_bottleneck.py --config configs/demo.yaml --warmup 20 --measure 40 labeler.workers=2

Per stage, in windows/s: the rate it ran at, how busy it was and so its capacity (rate / busy):

* streamer: windows sent/s; its CPU use (from /proc, with its child processes: the decode
  workers); it runs flat out when labelers sit on unused credits
  (``reliev3r_labelers_with_credit`` > 0), otherwise its rate is a lower bound.
* labelers: windows handled/s each, busy fraction = time in the decode and labelling stages
  (``reliev3r_labeler_stage_seconds``, the labelling thread: receiving a batch, and labelling it
  whole, its depth and matches overlapped where the teacher is on a GPU) per second,
  or the insert stage's (its own thread, overlapped with the labelling) when that is larger,
  and each stage's time per window.
* replay: inserts/s, samples/s, busy fraction = store + sample time per second (the store time
  is an upper bound: every window of a group commit observes the whole commit).
* learner: steps/s, samples/s, fraction of the time it waited for a batch with the GPU done
  (``reliev3r_learner_data_wait_seconds_total``), waits a step, each step's span on the GPU
  (``reliev3r_learner_step_gpu_seconds_total``), MFU; with ``--isolated`` also the learner
  alone afterwards: ``--isolated-batches`` batches sampled from the pipeline's own replay at the
  end of the window (its real windows: their matches, labels and teacher), then, with every
  stage stopped, the same config's ``Trainer`` on them from memory, each batch converted as
  the learner service does (``host_batch`` in a thread, ``device_batch`` in the training
  thread): the same work without the transport and without the other stages, free-running and
  then at the pipeline's cadence of waits for data.

Real video (issue 18's acceptance): give the sources and a held-out set as overrides, e.g. the
7-Scenes frames and a downsampled carry copy of ``../shared/data/videos``
(``benchmarks/carry_videos.py``) with the compiled recipe of ``configs/gpu.yaml``:

    python benchmarks/pipeline_bottleneck.py --config configs/gpu.yaml --isolated --json pb.json \\
        'streamer.sources=[.devdata/7s-train,.devdata/videos]' evaluator.data=7scenes:.devdata/7s-eval \\
        learner.compile=true

The run then ends with issue 18's figures, each a ratio from this one run (``acceptance`` in
the JSON): fresh windows/s (replay inserts) over the learner's samples/s (bar 0.25x: each
window trained on at most 4 times; stretch 1x), the learner's samples/s in the pipeline over
its rate alone with the same settings (``--isolated``; bar 0.9x, for the compiled recipe), and
the streamer's frames per CPU-second (decode and analysis, a per-core figure to set beside
``benchmarks/decode.py``'s readers). The JSON is written as soon as the pipeline stops and again
after the isolated run, so a run cut short there keeps the pipeline's figures.

The bottleneck is the stage with the lowest capacity relative to what the learner consumes
(samples/s): a producer below 1 means the learner trains faster than fresh windows arrive
(each window is sampled more than once, or, under ``replay.samples_per_insert``, the learner
waits); otherwise the learner itself is the limit. A learner waiting for data more than 10 %
of the time is upstream-bound whatever the estimates say. GPU utilisation comes from
``nvidia-smi`` when it exists. ``--json`` writes every number.

Benchmark defaults, applied before the user's overrides (so these can be overridden): free
ZeroMQ ports, no snapshots inside the window (``learner.snapshot_every``), no teacher refresh
(``labeler.refresh_step``: it stops and restarts stages, a one-off, not the steady state), no replay dedup
(the synthetic world loops; dedup would turn later passes into cheap duplicates), and an
evaluator reading the training world (no second render). The synthetic world is rendered
before ``up`` starts, so rendering is not part of any stage's warm-up. Make it large
(``streamer.synthetic.scenes``/``frames``): the streamer starts another pass over its archives
only once every window of the current pass is acknowledged, so a world of a few dozen windows
drains the pipeline at every pass and makes the streamer look slow (the demo world: streamer
"flat out" at 2.8 windows/s; 4x larger: labelers busy 0.96, the real limit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from reliev3r import config as rconfig
from reliev3r.cli import DEFAULT_CONFIG
from reliev3r.status import scrape, stage_kind, value

STARVED = 0.10
"""Learner data-wait fraction above which it is called upstream-bound."""
LABELER_STAGES = ("decode", "depth", "matches", "triangulation")
"""The labelling stages reported per window; ``insert`` runs on a thread of its own beside them."""
LABELER_BUSY = ("decode", "labelling")
"""The stages that add up to the labelling thread's busy time (``labelling``: a batch whole)."""
ORDER = ("streamer", "labeler", "replay", "learner")


def extract(kind: str, s) -> dict[str, float]:
    """The numbers this benchmark reads from one scrape of one process (absent ones left out)."""
    want: dict[str, tuple[str, dict]] = {}
    if kind == "streamer":
        want = {"sent": ("reliev3r_windows_sent_total", {}), "frames": ("reliev3r_decode_frames_total", {}),
                "resent": ("reliev3r_windows_resent_total", {}), "in_flight": ("reliev3r_windows_in_flight", {}),
                "labelers_with_credit": ("reliev3r_labelers_with_credit", {})}
    elif kind == "labeler":
        want = {f"windows_{st}": ("reliev3r_labeler_windows_total", {"status": st})
                for st in ("stored", "duplicate", "dropped", "insert_failed")}
        want.update({f"s_{st}": ("reliev3r_labeler_stage_seconds_sum", {"stage": st})
                     for st in (*LABELER_STAGES, "labelling", "insert")})
        want.update({f"frames_{k}": ("reliev3r_labeler_frames_total", {"features": k}) for k in ("detected", "reused")})
    elif kind == "replay":
        want = {"inserts": ("reliev3r_replay_inserts_total", {}), "samples": ("reliev3r_replay_samples_total", {}),
                "batches": ("reliev3r_replay_batches_total", {}),
                "not_ready": ("reliev3r_replay_not_ready_total", {"kind": "sample"}),
                "s_insert": ("reliev3r_replay_insert_seconds_sum", {}),
                "s_sample": ("reliev3r_replay_sample_seconds_sum", {}),
                "stored": ("reliev3r_replay_windows", {})}
    elif kind == "learner":
        want = {"step": ("reliev3r_learner_step", {}), "samples": ("reliev3r_learner_samples_total", {}),
                "wait": ("reliev3r_learner_data_wait_seconds_total", {}), "mfu": ("reliev3r_learner_mfu", {}),
                "waits": ("reliev3r_learner_data_waits_total", {}),
                "gpu": ("reliev3r_learner_step_gpu_seconds_total", {})}
    out = {}
    for key, (name, labels) in want.items():
        v = value(s, name, **labels)
        if v is None and labels:
            v = 0.0  # a labelled series appears with its first increment
        if v is not None:
            out[key] = v
    return out


def cpu_seconds(pid) -> float | None:
    """utime + stime of a process, in seconds (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def tree_cpu_seconds(pid) -> float | None:
    """utime + stime of a process and all its live descendants (the streamer's decode workers
    are child processes), in seconds, or None when the process is gone."""
    try:
        root = int(pid)
    except (TypeError, ValueError):
        return None
    own = cpu_seconds(root)
    if own is None:
        return None
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    total, todo = own, list(children.get(root, []))
    while todo:
        q = todo.pop()
        total += cpu_seconds(q) or 0.0
        todo.extend(children.get(q, []))
    return total


def usable_cpus() -> float:
    """CPUs this process may use: its affinity, capped by a cgroup v2 quota when there is one."""
    n = float(len(os.sched_getaffinity(0)))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return n


def gpu_sample() -> list[tuple[int, float, float]] | None:
    """(index, utilisation %, memory used MiB) per GPU from nvidia-smi, or None without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    rows = []
    for line in out.stdout.strip().splitlines():
        try:
            i, u, m = (x.strip() for x in line.split(","))
            rows.append((int(i), float(u), float(m)))
        except ValueError:
            continue
    return rows or None


class Recorder:
    """Scrapes of every process (and GPU samples) with their times."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.series: dict[str, list[tuple[float, dict[str, float]]]] = {}
        self.cpu: dict[str, list[tuple[float, float]]] = {}
        self.gpus: list[tuple[float, list[tuple[int, float, float]]]] = []
        self.gpu_ok = True

    def processes(self) -> dict:
        try:
            return json.loads((self.run_dir / "processes.json").read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def sample(self) -> dict[str, dict[str, float]]:
        now: dict[str, dict[str, float]] = {}
        for name, info in self.processes().items():
            kind = stage_kind(name)
            if kind == "supervisor" or not info.get("metrics"):
                continue
            s = scrape(info["metrics"], timeout=2.0)
            t = time.monotonic()
            if s is None:
                continue
            now[name] = extract(kind, s)
            self.series.setdefault(name, []).append((t, now[name]))
            c = tree_cpu_seconds(info.get("pid"))
            if c is not None:
                self.cpu.setdefault(name, []).append((t, c))
        if self.gpu_ok:
            g = gpu_sample()
            self.gpu_ok = g is not None
            if g:
                self.gpus.append((time.monotonic(), g))
        return now

    def window(self, name: str, t0: float, t1: float) -> dict | None:
        """Rates (``*_per_s``, counter deltas) and means (levels) of one process over [t0, t1]."""
        pts = [(t, v) for t, v in self.series.get(name, []) if t0 <= t <= t1]
        if len(pts) < 2:
            return None
        (ta, a), (tb, b) = pts[0], pts[-1]
        dt = tb - ta
        out: dict = {"seconds": dt}
        for key in b:
            if key in a:
                d = b[key] - a[key]
                out[f"d_{key}"] = d if d >= 0 else None  # a restart resets counters
            out[f"mean_{key}"] = sum(v.get(key, 0.0) for _, v in pts) / len(pts)
        cpts = [(t, c) for t, c in self.cpu.get(name, []) if t0 <= t <= t1]
        if len(cpts) >= 2 and cpts[-1][1] >= cpts[0][1]:
            out["cpu_cores"] = (cpts[-1][1] - cpts[0][1]) / max(cpts[-1][0] - cpts[0][0], 1e-9)
        return out


def rate(w: dict, key: str) -> float | None:
    d = w.get(f"d_{key}")
    return None if d is None else d / max(w["seconds"], 1e-9)


def analyse(rec: Recorder, t0: float, t1: float, isolated: dict | None) -> dict:
    stages: dict[str, dict] = {}
    for name in rec.series:
        w = rec.window(name, t0, t1)
        if w is None:
            continue
        kind, row = stage_kind(name), {"cpu_cores": w.get("cpu_cores")}
        if kind == "streamer":
            row.update(windows_per_s=rate(w, "sent"), frames_per_s=rate(w, "frames"), resent_per_s=rate(w, "resent"),
                       in_flight_mean=w.get("mean_in_flight"),
                       labelers_with_credit_mean=w.get("mean_labelers_with_credit"))
            cores = w.get("cpu_cores")
            row["frames_per_cpu_s"] = (row["frames_per_s"] / cores if row["frames_per_s"] is not None and cores
                                       else None)
        elif kind == "labeler":
            counts = {st: w.get(f"d_windows_{st}") or 0.0 for st in ("stored", "duplicate", "dropped", "insert_failed")}
            handled = sum(counts.values())
            busy = {st: (w.get(f"d_s_{st}") or 0.0) for st in (*LABELER_STAGES, "insert")}
            labelling = sum(w.get(f"d_s_{st}") or 0.0 for st in LABELER_BUSY)
            row.update(windows_per_s=handled / w["seconds"], stored_per_s=counts["stored"] / w["seconds"],
                       dropped_per_s=counts["dropped"] / w["seconds"],
                       busy_fraction=max(labelling, busy["insert"]) / w["seconds"],
                       seconds_per_window={st: (v / handled if handled else None) for st, v in busy.items()})
            frames = {k: w.get(f"d_frames_{k}") or 0.0 for k in ("detected", "reused")}
            row["features_reused_fraction"] = (frames["reused"] / sum(frames.values()) if sum(frames.values())
                                               else None)
        elif kind == "replay":
            busy = ((w.get("d_s_insert") or 0.0) + (w.get("d_s_sample") or 0.0)) / w["seconds"]
            row.update(inserts_per_s=rate(w, "inserts"), samples_per_s=rate(w, "samples"),
                       batches_per_s=rate(w, "batches"), not_ready_per_s=rate(w, "not_ready"),
                       busy_fraction=busy, stored_mean=w.get("mean_stored"))
        elif kind == "learner":
            wait = w.get("d_wait")
            steps = w.get("d_step")
            per_step = {k: (w[f"d_{k}"] / steps if steps and w.get(f"d_{k}") is not None else None)
                        for k in ("waits", "gpu")}
            row.update(steps_per_s=rate(w, "step"), samples_per_s=rate(w, "samples"),
                       data_wait_fraction=None if wait is None else wait / w["seconds"], mfu_mean=w.get("mean_mfu"),
                       waits_per_step=per_step["waits"], gpu_seconds_per_step=per_step["gpu"])
        else:
            continue
        row["seconds"] = w["seconds"]
        stages[name] = row

    gpus: dict[int, list[tuple[float, float]]] = {}
    for t, rows in rec.gpus:
        if t0 <= t <= t1:
            for i, u, m in rows:
                gpus.setdefault(i, []).append((u, m))
    gpu = [{"index": i, "util_mean": sum(u for u, _ in v) / len(v), "mem_used_mib_max": max(m for _, m in v)}
           for i, v in sorted(gpus.items())]
    cpu = {"cores_used": sum(r["cpu_cores"] or 0.0 for r in stages.values()), "cores_usable": usable_cpus()}
    result = {"window_seconds": t1 - t0, "stages": stages, "gpus": gpu, "cpu": cpu, "isolated_learner": isolated,
              **verdict(stages, isolated), "acceptance": acceptance(stages, isolated)}
    if cpu["cores_used"] >= 0.9 * cpu["cores_usable"]:
        result["reason"] += (f"; CPU saturated ({cpu['cores_used']:.1f} of {cpu['cores_usable']:g} cores busy): "
                             "every rate includes CPU contention between the stages")
    return result


def running_rate(samples: float | None, wait: float | None) -> float | None:
    """The learner's samples/s while it is not waiting for data (``wait``: the share of the time
    it waited), contention included; None without either figure."""
    return samples / max(1.0 - wait, 1e-6) if samples and wait is not None else None


def verdict(stages: dict[str, dict], isolated: dict | None) -> dict:
    """Capacities (windows/s) of the stages, each over the learner's demand, and the bottleneck."""
    learner = stages.get("learner", {})
    demand = learner.get("samples_per_s") or 0.0
    caps: dict[str, dict] = {}
    st = stages.get("streamer")
    if st and st.get("windows_per_s") is not None:
        flat_out = (st.get("labelers_with_credit_mean") or 0.0) >= 0.5
        caps["streamer"] = {"capacity": st["windows_per_s"], "exact": flat_out,
                            "note": "flat out (labelers wait with credits)" if flat_out
                            else "lower bound (held back by labeler credits)"}
    labs = [r for n, r in stages.items() if stage_kind(n) == "labeler"]
    if labs:
        cap = sum(r["windows_per_s"] / r["busy_fraction"] if r["busy_fraction"] > 1e-6 else math.inf for r in labs)
        busy = ", ".join(f"{r['busy_fraction']:.2f}" for r in labs)
        caps["labelers"] = {"capacity": cap, "exact": True, "note": f"{len(labs)} labeler(s), busy {busy}"}
    rp = stages.get("replay")
    if rp and rp.get("inserts_per_s") is not None:
        b = rp["busy_fraction"]
        caps["replay"] = {"capacity": rp["inserts_per_s"] / b if b > 1e-6 else math.inf, "exact": False,
                          "note": f"busy {b:.2f} (store + sample)"}
    wait = learner.get("data_wait_fraction")
    if demand:  # what it trains at in the pipeline when never waiting (contention included)
        cap = running_rate(demand, wait) or demand
        note = "samples/s / (1 - data wait)" if wait is not None else "samples/s (no data-wait metric)"
        if isolated and isolated.get("samples_per_s"):
            note += f"; alone on {isolated['batches']} of its batches: {isolated['samples_per_s']:.2f}"
        caps["learner"] = {"capacity": cap, "exact": wait is not None, "note": note}
    for c in caps.values():
        c["over_demand"] = c["capacity"] / demand if demand else None
    if not demand:
        return {"capacities": caps, "bottleneck": None,
                "reason": "the learner trained nothing in the window (raise --warmup/--measure, check the logs)"}
    starved = wait is not None and wait > STARVED
    # A streamer held back by labeler credits is faster than its rate: it cannot be the limit.
    producers = {k: c for k, c in caps.items() if k != "learner" and (c["exact"] or k != "streamer")}
    slowest = min(producers, key=lambda k: producers[k]["over_demand"]) if producers else None
    name = slowest if slowest and (starved or producers[slowest]["over_demand"] < 1) else "learner"
    if name == "learner":
        least = min((c["over_demand"] for k, c in caps.items() if k != "learner"), default=math.inf)
        reason = (f"learner-bound: it waits for data {100 * (wait or 0):.0f} % of the time; every producer can "
                  f"deliver at least {least:.2f}x what it consumes")
        if starved:
            reason = f"upstream-bound, producer unknown: {reason}"
    else:
        reason = (f"{name} capacity {caps[name]['capacity']:.2f} windows/s against learner demand {demand:.2f} "
                  f"samples/s ({caps[name]['over_demand']:.2f}x)")
        if starved:
            reason = f"upstream-bound: learner waits for data {100 * wait:.0f} % of the time; " + reason
        else:
            reason += "; the learner reuses windows rather than waits (replay samples/insert > 1)"
    if isolated and isolated.get("samples_per_s") and demand < 0.9 * isolated["samples_per_s"] and not starved:
        reason += (f"; the learner runs at {demand / isolated['samples_per_s']:.2f}x its isolated rate without "
                   "waiting for data: contention (shared GPU or CPU)")
    return {"capacities": caps, "bottleneck": name, "reason": reason}


FRESH_BAR, FRESH_STRETCH, ALONE_BAR = 0.25, 1.0, 0.9
"""Issue 18: fresh windows/s over learner samples/s (each window trained on at most 4 times;
stretch: once), and the learner's samples/s in the pipeline over alone."""


def acceptance(stages: dict[str, dict], isolated: dict | None) -> dict:
    """Issue 18's pipeline figures, each a ratio of rates measured in this run (None where a
    rate is missing): ``fresh_over_samples`` = fresh windows/s (replay inserts/s; the labelers'
    stored windows/s without a replay scrape) / learner samples/s, and its inverse, the mean
    number of times a window is trained on; ``pipeline_over_alone`` = learner samples/s in the
    pipeline / alone on batches recorded from its replay (``--isolated``); ``running_over_alone``
    = the same with the pipeline's rate taken while the learner is not waiting for data (samples/s
    / (1 - data wait)), since under ``replay.samples_per_insert`` the learner waits for fresh
    windows by design, and that wait is not contention; ``running_over_alone_at_cadence`` = that
    rate over the learner's alone at the pipeline's cadence (:func:`learner_alone`): what the bar
    judges where it ran, the learner then starting as many steps on an idle GPU alone as in the
    pipeline; the learner's step span on the GPU alone and in the pipeline; the streamer's frames
    per CPU-s."""
    learner = stages.get("learner", {})
    samples = learner.get("samples_per_s")
    rp = stages.get("replay") or {}
    fresh = rp.get("inserts_per_s")
    source = "replay inserts/s"
    if fresh is None:
        labs = [r for n, r in stages.items() if stage_kind(n) == "labeler"]
        fresh = sum(r["stored_per_s"] for r in labs) if labs else None
        source = "labelers' stored windows/s"
    ratio = fresh / samples if fresh is not None and samples else None
    alone = (isolated or {}).get("samples_per_s")
    gated = (isolated or {}).get("gated_samples_per_s")
    wait = learner.get("data_wait_fraction")
    running = running_rate(samples, wait)
    st = stages.get("streamer") or {}
    out = {"fresh_windows_per_s": fresh, "fresh_from": source, "learner_samples_per_s": samples,
           "fresh_over_samples": ratio, "trained_per_window": 1 / ratio if ratio else None,
           "fresh_bar": FRESH_BAR, "fresh_ok": None if ratio is None else ratio >= FRESH_BAR,
           "fresh_stretch_ok": None if ratio is None else ratio >= FRESH_STRETCH,
           "learner_alone_samples_per_s": alone,
           "pipeline_over_alone": samples / alone if samples and alone else None, "alone_bar": ALONE_BAR,
           "learner_running_samples_per_s": running,
           "running_over_alone": running / alone if running and alone else None,
           "learner_alone_at_cadence_samples_per_s": gated,
           "running_over_alone_at_cadence": running / gated if running and gated else None,
           "learner_data_wait_fraction": wait,
           "learner_waits_per_step": learner.get("waits_per_step"),
           "learner_gpu_seconds_per_step": learner.get("gpu_seconds_per_step"),
           "alone_gpu_seconds_per_step": (isolated or {}).get("gpu_seconds_per_step"),
           "streamer_frames_per_s": st.get("frames_per_s"), "streamer_cpu_cores": st.get("cpu_cores"),
           "streamer_frames_per_cpu_s": st.get("frames_per_cpu_s")}
    gpu, gpu_alone = out["learner_gpu_seconds_per_step"], out["alone_gpu_seconds_per_step"]
    out["gpu_span_alone_over_pipeline"] = gpu_alone / gpu if gpu and gpu_alone else None
    # judged against the learner alone at the pipeline's cadence where it ran (a learner held back
    # by the bound on reuse starts most steps on an idle GPU, alone as well), else free-running
    judged = next((out[k] for k in ("running_over_alone_at_cadence", "running_over_alone", "pipeline_over_alone")
                   if out[k] is not None), None)
    out["alone_ok"] = None if judged is None else judged >= ALONE_BAR
    return out


def acceptance_table(acc: dict, compiled: bool | None = None) -> str:
    """Issue 18's figures of one run as a markdown table."""
    def ok(flag):
        return "-" if flag is None else ("yes" if flag else "NO")

    alone_note = "learner alone: not run (--isolated)" if acc["learner_alone_samples_per_s"] is None else (
        f"{fmt(acc['learner_samples_per_s'])} in the pipeline / {fmt(acc['learner_alone_samples_per_s'])} alone "
        "samples/s")
    if compiled is False:
        alone_note += "; NOT the compiled recipe (learner.compile=false)"
    rows = ["| issue 18 figure | ratio | bar | met | from |", "|---|---:|---:|---|---|",
            f"| fresh windows/s / learner samples/s | {fmt(acc['fresh_over_samples'])}x | >= {acc['fresh_bar']:g}x "
            f"(stretch 1x) | {ok(acc['fresh_ok'])} (stretch {ok(acc['fresh_stretch_ok'])}) | "
            f"{fmt(acc['fresh_windows_per_s'])} {acc['fresh_from']} / {fmt(acc['learner_samples_per_s'])} samples/s; "
            f"each window trained {fmt(acc['trained_per_window'], '.1f')} times |",
            f"| learner in the pipeline / alone, same settings | {fmt(acc['pipeline_over_alone'])}x | - | - | "
            f"{alone_note}; data wait {fmt(acc['learner_data_wait_fraction'])} |",
            f"| learner while not waiting for data / alone at the pipeline's cadence "
            f"| {fmt(acc.get('running_over_alone_at_cadence'))}x | >= {acc['alone_bar']:g}x | {ok(acc['alone_ok'])} "
            f"| {fmt(acc.get('learner_running_samples_per_s'))} samples/s / (1 - data wait), against "
            f"{fmt(acc.get('learner_alone_at_cadence_samples_per_s'))} alone waiting before as many steps |",
            f"| learner while not waiting for data / alone free-running | {fmt(acc.get('running_over_alone'))}x | - "
            f"| - | against {fmt(acc['learner_alone_samples_per_s'])} samples/s alone, a batch always ready |",
            f"| learner's step on the GPU, alone / in the pipeline | {fmt(acc.get('gpu_span_alone_over_pipeline'))}x "
            f"| - | - | {fmt_ms(acc.get('alone_gpu_seconds_per_step'))} / "
            f"{fmt_ms(acc.get('learner_gpu_seconds_per_step'))} ms from its first operation to its last; "
            f"{fmt(acc.get('learner_waits_per_step'))} waits for data a step |",
            f"| streamer frames per CPU-s (decode + analysis) | {fmt(acc['streamer_frames_per_cpu_s'], '.1f')} | "
            f"beside benchmarks/decode.py | - | {fmt(acc['streamer_frames_per_s'], '.1f')} frames/s on "
            f"{fmt(acc['streamer_cpu_cores'])} cores |"]
    return "\n".join(rows)


def finite(x):
    """``x`` with infinite floats as None (strict JSON)."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else ("inf" if v == math.inf else format(v, spec))


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def table(result: dict) -> str:
    lines = ["| stage | windows/s | busy | CPU cores | per window | notes |", "|---|---:|---:|---:|---|---|"]
    for name, r in sorted(result["stages"].items(), key=lambda kv: (ORDER.index(stage_kind(kv[0])), kv[0])):
        kind = stage_kind(name)
        if kind == "streamer":
            lines.append(f"| {name} | {fmt(r['windows_per_s'])} sent | - | {fmt(r['cpu_cores'])} | - | "
                         f"{fmt(r['frames_per_s'], '.1f')} frames/s "
                         f"({fmt(r.get('frames_per_cpu_s'), '.1f')} per CPU-s), "
                         f"in flight {fmt(r['in_flight_mean'], '.1f')}, "
                         f"labelers with credit {fmt(r['labelers_with_credit_mean'])} |")
        elif kind == "labeler":
            per = " ".join(f"{k} {1e3 * v:.0f} ms" for k, v in r["seconds_per_window"].items() if v is not None)
            lines.append(f"| {name} | {fmt(r['windows_per_s'])} labelled | {fmt(r['busy_fraction'])} | "
                         f"{fmt(r['cpu_cores'])} | {per} | stored {fmt(r['stored_per_s'])}/s, dropped "
                         f"{fmt(r['dropped_per_s'])}/s, features reused {fmt(r.get('features_reused_fraction'))} |")
        elif kind == "replay":
            lines.append(f"| {name} | {fmt(r['inserts_per_s'])} in, {fmt(r['samples_per_s'])} out | "
                         f"{fmt(r['busy_fraction'])} | {fmt(r['cpu_cores'])} | - | not ready "
                         f"{fmt(r['not_ready_per_s'])}/s, stored {fmt(r['stored_mean'], '.0f')} |")
        elif kind == "learner":
            lines.append(f"| {name} | {fmt(r['samples_per_s'])} samples ({fmt(r['steps_per_s'])} steps/s) | "
                         f"{fmt(None if r['data_wait_fraction'] is None else 1 - r['data_wait_fraction'])} | "
                         f"{fmt(r['cpu_cores'])} | - | data wait {fmt(r['data_wait_fraction'])}, MFU "
                         f"{fmt(r['mfu_mean'], '.3f')} |")
    iso = result.get("isolated_learner")
    if iso:
        lines.append(f"| learner, isolated | {fmt(iso['samples_per_s'])} samples | - | - | - | "
                     f"{iso['batches']} batches recorded from replay, {iso['steps']} steps |")
    out = ["\n".join(lines)]
    cpu = result["cpu"]
    out.append(f"CPU: the stages used {cpu['cores_used']:.2f} of {cpu['cores_usable']:g} usable cores")
    if result["gpus"]:
        out.append("GPU utilisation: " + ", ".join(f"GPU{g['index']} {g['util_mean']:.0f} % "
                                                   f"({g['mem_used_mib_max']:.0f} MiB)" for g in result["gpus"]))
    caps = result["capacities"]
    out.append("\n".join(["| stage | capacity (windows/s) | / learner demand | how |", "|---|---:|---:|---|"] + [
        f"| {k} | {'' if c['exact'] else '>= '}{fmt(c['capacity'])} | {fmt(c['over_demand'])} | {c['note']} |"
        for k, c in caps.items()]))
    out.append(f"bottleneck: {result['bottleneck']} ({result['reason']})")
    return "\n\n".join(out)


def record_batches(run_dir: Path, folder: Path, count: int) -> int:
    """Up to ``count`` batches sampled from the running pipeline's replay as its learner samples
    them (its batch size, rank 0; the resolved ports and CURVE keys of ``<run.dir>/config.yaml``),
    saved in ``folder`` as ``batch-NNN.npz`` + ``.json`` (arrays, meta); how many were saved."""
    from replay.client import ReplayClient, ReplayError

    resolved = rconfig.load([run_dir / "config.yaml"])
    folder.mkdir(parents=True, exist_ok=True)
    client = ReplayClient(resolved.network.connect(resolved.network.replay_port), timeout_s=10.0, retry_s=2.0,
                          curve=resolved.network.curve)
    saved = 0
    try:
        for k in range(count):
            try:
                msg = client.sample(resolved.learner.batch_size, 0, timeout_s=10.0)
            except (TimeoutError, ReplayError) as err:
                print(f"recording the learner's batches: stopped after {saved} ({err!r})", flush=True)
                break
            np.savez(folder / f"batch-{k:03d}.npz", **msg.arrays)
            (folder / f"batch-{k:03d}.json").write_text(json.dumps(msg.meta))
            saved += 1
    finally:
        client.close()
    return saved


def learner_alone(configs: list[str], overrides: list[str], folder: Path, steps: int, warmup: int,
                  cadence: tuple[float, float] | None = None) -> dict:
    """The pipeline's learner (its ``Trainer``, config and seed) alone on the batches of
    :func:`record_batches`, round robin from host memory, each batch converted as the learner
    service does (its arrays copied into pinned host tensors by a thread, as the service's
    prefetch thread does, then queued to the device by the training thread) and each step read
    back after the next one is launched, as the service does (until the eighteenth pass of issue
    18 the steps here were read at their end, as the service then did); samples/s over
    ``steps`` steps after ``warmup`` (with ``learner.cuda_graphs`` or ``learner.compile``, at
    least one pass over the batches: each batch's graph is recorded, and each new shape of its
    matches compiled, before the timing; graphs recorded while timed are counted). With five
    warm-up steps the compiled step's rate alone read 212.7 and 313.4 samples/s in two calls
    on one H100 (issue 18, fifteenth pass).

    With ``cadence`` = (waits a step, seconds a wait), as measured in the pipeline
    (``learner_data_waits_total``, ``learner_data_wait_seconds_total``), the same steps run
    again fed at the pipeline's cadence: before that share of the steps the learner waits as
    its service does with no batch ready (until the GPU is done, then reads the step in flight,
    then idles that long), and ``gated_samples_per_s`` is its rate while not waiting, the
    pipeline's own measure. A learner held back by replay's bound on reuse starts most steps
    on an idle GPU, so this rate, not the free-running one, is what the pipeline's learner would
    reach if the stages beside it took nothing from it."""
    import queue
    import threading

    import torch

    from learner.train import PendingStep, Trainer, device_batch, host_batch, teacher_space_of
    from reliev3r import protocol

    cfg = rconfig.load([DEFAULT_CONFIG, *configs], overrides)
    trainer = Trainer(cfg.learner, device=cfg.learner.device, seed=cfg.run.seed)
    messages = []
    for path in sorted(folder.glob("batch-*.npz")):
        with np.load(path) as z:
            arrays = {name: z[name] for name in z.files}
        messages.append(protocol.Message("batch", json.loads(path.with_suffix(".json").read_text()), arrays))
    if not messages:
        raise SystemExit(f"no recorded batches in {folder}")

    graphs = getattr(trainer, "graphs", None)
    if graphs is not None or cfg.learner.compile:  # every batch's graph / shapes ready before the timing
        warmup = max(warmup, len(messages))
    ready: queue.Queue = queue.Queue(maxsize=1)  # one batch ahead, as the service's Prefetcher(depth=1)

    def produce() -> None:
        for k in range(warmup + 2 * steps):
            msg = messages[k % len(messages)]
            ready.put((msg, host_batch(msg, pin=trainer.device.type == "cuda")))

    threading.Thread(target=produce, daemon=True, name="host-batches").start()

    def step(k: int) -> PendingStep:  # the learner's order: each step read back after the next one is launched
        msg, host = ready.get()
        pending = trainer.launch(device_batch(host, trainer.device), teacher_space=teacher_space_of(msg))
        if len(trainer.unsettled) > 1:
            trainer.settle(trainer.unsettled[0])
        return pending

    for k in range(warmup):
        step(k)
    trainer.settle_all()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    recorded = graphs.captures if graphs is not None else 0

    def timed(first: int, waits: float = 0.0, idle: float = 0.0) -> tuple[float, list[PendingStep]]:
        start, waited, due, launched = time.perf_counter(), 0.0, 0.0, []
        for k in range(steps):
            due += waits
            if due >= 1.0:  # no batch ready: as the service, until the GPU is done, then idle
                due -= 1.0
                while trainer.unsettled and not trainer.unsettled[-1].done():
                    time.sleep(0.001)
                trainer.settle_all()
                idle_start = time.perf_counter()
                time.sleep(idle)
                waited += time.perf_counter() - idle_start
            launched.append(step(first + k))
        trainer.settle_all()
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return steps * cfg.learner.batch_size / (time.perf_counter() - start - waited), launched

    rate, launched = timed(warmup)
    spans = [p.gpu_seconds for p in launched if p.gpu_seconds is not None]
    gated = timed(warmup + steps, *cadence)[0] if cadence else None
    return {"samples_per_s": rate, "steps_per_s": rate / cfg.learner.batch_size, "device": str(trainer.device),
            "gated_samples_per_s": gated, "cadence": cadence,
            "gpu_seconds_per_step": sum(spans) / len(spans) if spans else None,
            "steps": steps, "warmup": warmup, "batches": len(messages),
            "graphs_recorded_timed": None if graphs is None else graphs.captures - recorded}


def cadence_of(stages: dict[str, dict]) -> tuple[float, float] | None:
    """The learner's waits for data in the pipeline: (waits a step, seconds a wait), for
    :func:`learner_alone`'s run at the pipeline's cadence; None where it did not wait."""
    lr = stages.get("learner") or {}
    waits, wait, rate = lr.get("waits_per_step"), lr.get("data_wait_fraction"), lr.get("steps_per_s")
    if not waits or wait is None or not rate:
        return None
    return min(waits, 1.0), wait / (waits * rate)


def alone_env(environ: dict[str, str]) -> dict[str, str]:
    """The isolated learner's environment: the pipeline's without a CUDA MPS daemon's settings.
    Alone means the plain learner on its GPU; under MPS it ran slower (574.9 against 607.8-619.6
    samples/s on one H100), which had made an MPS pipeline's ratio to it look better than it was
    (docs/BENCHMARKS.md, issue 18, seventeenth pass)."""
    return {k: v for k, v in environ.items() if not k.startswith("CUDA_MPS_")}


def stop_pipeline(up: subprocess.Popen, timeout: float) -> None:
    """Stop ``reliev3r up`` (started in a session of its own) and every stage: SIGINT to the
    supervisor, which stops them in order; whatever of its process group is left after
    ``timeout`` seconds (the supervisor stuck, or already gone with stages left) is killed."""
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(up.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is empty: every stage stopped
        pass
    up.wait()


def isolated_rate(configs: list[str], overrides: list[str], folder: Path, steps: int,
                  timeout: float | None = None, cadence: tuple[float, float] | None = None) -> dict | None:
    """:func:`learner_alone` in a fresh process (``--alone``, no MPS client: :func:`alone_env`),
    once every stage has stopped."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--alone", str(folder), "--alone-json", f.name,
               "--isolated-steps", str(steps), *[x for c in configs for x in ("--config", c)],
               *(["--alone-cadence", *map(str, cadence)] if cadence else []), *overrides]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=alone_env(dict(os.environ)))
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            print(f"isolated learner: no result within {timeout:g} s")
            return None
        if proc.returncode != 0:
            print(f"isolated learner failed:\n{output[-3000:]}")
            return None
        return json.loads(Path(f.name).read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="passed to reliev3r up")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides for reliev3r up")
    p.add_argument("--out", default=None, help="folder for the run (run/, up.log); default: a new temp folder")
    p.add_argument("--warmup", type=float, default=60.0, help="seconds after the learner's first step")
    p.add_argument("--measure", type=float, default=None, help="seconds measured (default 120; with --max-steps: "
                                                               "until the run ends)")
    p.add_argument("--max-steps", type=int, default=None, help="passed to reliev3r up; the run ends there")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between scrapes")
    p.add_argument("--startup-timeout", type=float, default=900.0, help="seconds to wait for the first step")
    p.add_argument("--isolated", action="store_true",
                   help="also time the learner alone on batches recorded from the pipeline's replay")
    p.add_argument("--isolated-steps", type=int, default=20)
    p.add_argument("--isolated-warmup", type=int, default=5, help="steps before timing (compilation)")
    p.add_argument("--isolated-batches", type=int, default=16, help="batches recorded from replay")
    p.add_argument("--alone", default=None, help=argparse.SUPPRESS)  # the isolated run's own process
    p.add_argument("--alone-json", default=None, help=argparse.SUPPRESS)
    p.add_argument("--alone-cadence", type=float, nargs=2, default=None, help=argparse.SUPPRESS)
    p.add_argument("--isolated-timeout", type=float, default=None, help="seconds for the isolated run")
    p.add_argument("--json", default=None, help="write the raw numbers here")
    args = p.parse_args()
    if args.alone:
        result = learner_alone(args.config, args.overrides, Path(args.alone), args.isolated_steps,
                               args.isolated_warmup, tuple(args.alone_cadence) if args.alone_cadence else None)
        Path(args.alone_json).write_text(json.dumps(result))
        return 0
    measure = args.measure if args.measure is not None else (math.inf if args.max_steps else 120.0)

    out = Path(args.out or tempfile.mkdtemp(prefix="pipeline-bottleneck-")).resolve()
    run_dir = out / "run"
    out.mkdir(parents=True, exist_ok=True)
    user = list(args.overrides)
    base = [f"run.dir={run_dir}", "network.work_port=0", "network.replay_port=0", "network.supervisor_port=0",
            "learner.snapshot_every=1000000000", "labeler.refresh_step=0", "replay.dedup=false"]
    cfg = rconfig.load([DEFAULT_CONFIG, *args.config], base + user)
    if not cfg.streamer.sources:
        base.append(f"evaluator.data=synthetic:{run_dir / 'world'}")
    overrides = base + user
    cfg = rconfig.load([DEFAULT_CONFIG, *args.config], overrides)
    configs = [x for c in args.config for x in ("--config", str(Path(c).resolve()))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cli = [sys.executable, "-m", "reliev3r.cli"]
    print(f"pipeline bottleneck: run folder {run_dir}; overrides: {' '.join(overrides)}", flush=True)

    render_s = None
    if not cfg.streamer.sources:
        st = cfg.streamer
        per_pass = st.synthetic.scenes * max(0, (st.synthetic.frames - (st.views - 1) * st.frame_stride - 1)
                                             // st.window_step + 1)
        if per_pass < 200:
            print(f"note: the synthetic world holds about {per_pass} windows per pass; each pass ends with the "
                  "pipeline drained (raise streamer.synthetic.scenes/frames for a steadier stream)", flush=True)
        start = time.monotonic()
        with open(out / "render.log", "wb") as log:
            code = subprocess.run([*cli, "render", "--out", str(run_dir / "world"), *configs, *overrides],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        render_s = time.monotonic() - start
        if code != 0:
            print(f"rendering the synthetic world failed (exit {code}); see {out / 'render.log'}")
            return 1
        print(f"synthetic world ready in {render_s:.1f} s", flush=True)

    up_cmd = [*cli, "up", *configs, *overrides, *(["--max-steps", str(args.max_steps)] if args.max_steps else [])]
    up_log = open(out / "up.log", "wb")
    up = subprocess.Popen(up_cmd, cwd=ROOT, env=env, stdout=up_log, stderr=subprocess.STDOUT,
                          stdin=subprocess.DEVNULL, start_new_session=True)
    rec = Recorder(run_dir)
    lc, st = cfg.learner, cfg.streamer
    setup = {"overrides": overrides, "configs": args.config, "labeler_workers": cfg.labeler.workers,
             "labeler_device": cfg.labeler.device, "teacher": cfg.labeler.teacher,
             "matcher": cfg.labeler.matcher, "labeler_cpu_threads": cfg.labeler.cpu_threads,
             "learner_device": lc.device, "model": lc.model.size, "batch_size": lc.batch_size,
             "compile": lc.compile, "precision": lc.precision, "views": st.views, "height": st.height,
             "width": st.width, "sources": list(st.sources) or "synthetic", "decode_workers": st.decode_workers,
             "samples_per_insert": cfg.replay.samples_per_insert, "evaluator_data": cfg.evaluator.data,
             "render_seconds": render_s, "warmup_s": args.warmup, "run_dir": str(run_dir),
             "host_cpus": os.cpu_count(),
             "env": {k: os.environ[k] for k in ("OPENCV_FOR_THREADS_NUM", "OMP_NUM_THREADS", "CUDA_MPS_PIPE_DIRECTORY")
                     if k in os.environ}}

    def report(isolated, t0, t1):
        result = analyse(rec, t0, t1, isolated)
        result["setup"] = setup
        if args.json:
            Path(args.json).write_text(json.dumps(finite(result), indent=2))
        return result

    started = time.monotonic()
    first_step = t0 = t1 = None
    phase = "starting"
    interrupted = False
    try:
        try:
            while True:
                tick = time.monotonic()
                now = rec.sample()
                step = now.get("learner", {}).get("step", 0.0)
                if first_step is None and step >= 1:
                    first_step = time.monotonic()
                    t0 = first_step + args.warmup
                    print(f"[{first_step - started:6.1f}s] learner stepping; warm-up {args.warmup:.0f} s", flush=True)
                if t0 is not None and phase == "starting" and time.monotonic() >= t0:
                    phase = "measuring"
                    print(f"[{time.monotonic() - started:6.1f}s] measuring", flush=True)
                if up.poll() is not None:
                    print(f"reliev3r up exited with code {up.returncode}", flush=True)
                    break
                if phase == "measuring":
                    t1 = time.monotonic()
                    if t1 - t0 >= measure or (args.max_steps and step >= args.max_steps):
                        break
                if first_step is None and time.monotonic() - started > args.startup_timeout:
                    print(f"no learner step after {args.startup_timeout:.0f} s; see {out / 'up.log'}, "
                          f"{run_dir / 'logs'}")
                    break
                time.sleep(max(0.0, args.interval - (time.monotonic() - tick)))
        except KeyboardInterrupt:  # e.g. an outer timeout: keep what was measured so far
            interrupted = True
            print(f"[{time.monotonic() - started:6.1f}s] interrupted: the window measured so far counts", flush=True)
    finally:
        measured = t0 is not None and t1 is not None and t1 - t0 >= 2 * args.interval
        try:
            # written before the pipeline stops: an interrupt or kill that follows keeps it
            first = report(None, t0, t1) if measured else None
            recorded = 0
            if measured and args.isolated and not interrupted and up.poll() is None:
                recorded = record_batches(run_dir, out / "batches", args.isolated_batches)
        finally:  # whatever failed above, no stage outlives this script
            stop_pipeline(up, 30 if interrupted else 120)
            up_log.close()
    if t0 is None or t1 is None or t1 - t0 < 2 * args.interval:
        print(f"no steady window measured (learner never stepped, or the run ended during warm-up); "
              f"see {out / 'up.log'}")
        return 1

    isolated = (isolated_rate([str(Path(c).resolve()) for c in args.config], overrides, out / "batches",
                              args.isolated_steps, args.isolated_timeout, cadence_of(first["stages"]))
                if recorded else None)
    result = report(isolated, t0, t1)
    print(f"\npipeline: {cfg.labeler.workers} labeler(s) on {cfg.labeler.device} ({cfg.labeler.teacher} + "
          f"{cfg.labeler.matcher}), learner {lc.model.size} on {lc.device}, batch {lc.batch_size}"
          f"{', compiled' if lc.compile else ''}, {st.views} views {st.height}x{st.width}; sources "
          f"{' '.join(st.sources) or 'synthetic'}; steady window {result['window_seconds']:.0f} s after "
          f"{args.warmup:.0f} s warm-up\n")
    print(table(result))
    print()
    print(acceptance_table(result["acceptance"], compiled=lc.compile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
