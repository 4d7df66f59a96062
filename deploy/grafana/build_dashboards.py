"""Writes the Grafana dashboards under ``deploy/grafana/dashboards/`` (run it after editing).

Dashboards are generated rather than hand-edited so every panel gets the same pinned
datasource and layout; ``tests/test_deploy.py`` checks the committed JSON matches this file.
Each query must return data on a healthy pipeline (the acceptance test checks that through a
real Prometheus): counters whose series appear only when something goes wrong (errors, drops,
rejections) end in ``or on() vector(0)`` so the panel shows zero instead of "no data".

    .venv/bin/python deploy/grafana/build_dashboards.py
"""

from __future__ import annotations

import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "reliev3r-prometheus"}
OUT = Path(__file__).resolve().parent / "dashboards"
ZERO = " or on() vector(0)"


def panel(title: str, targets: list[tuple[str, str]], *, unit: str = "short", kind: str = "timeseries",
          description: str = "") -> dict:
    return {"type": kind, "title": title, "description": description, "datasource": DATASOURCE,
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
            "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                        for i, (expr, legend) in enumerate(targets)]}


def dashboard(uid: str, title: str, panels: list[dict]) -> dict:
    for i, p in enumerate(panels):
        p["id"] = i + 1
        p["gridPos"] = {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)}
    return {"uid": uid, "title": title, "tags": ["reliev3r"], "timezone": "browser", "schemaVersion": 39,
            "version": 1, "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": []}, "annotations": {"list": []}, "panels": panels}


OVERVIEW = dashboard("reliev3r-overview", "reliev3r / pipeline overview", [
    panel("Windows through each stage", [
        ("sum(rate(reliev3r_windows_sent_total[1m]))", "streamed"),
        ("sum(rate(reliev3r_labeler_windows_total[1m]))", "labelled"),
        ("sum(rate(reliev3r_replay_inserts_total[1m]))", "stored"),
        ("sum(rate(reliev3r_replay_samples_total[1m]))", "sampled"),
        ("sum(rate(reliev3r_learner_samples_total[1m]))", "trained on"),
    ], unit="ops", description="Windows per second leaving the streamer, labelled, stored, sampled and trained on"),
    panel("Frames decoded", [("sum by (source) (rate(reliev3r_decode_frames_total[1m]))", "{{source}}")], unit="ops"),
    panel("Windows in flight (streamer -> labelers)", [
        ("sum(reliev3r_windows_in_flight)", "in flight"),
        ("sum(reliev3r_labelers_with_credit)", "labelers with credit"),
    ]),
    panel("Replay size", [("sum(reliev3r_replay_windows)", "windows")]),
    panel("Replay bytes", [("sum(reliev3r_replay_bytes)", "bytes")], unit="bytes"),
    panel("Replay samples per insert / waiting requests", [
        ("max(reliev3r_replay_samples_per_insert)", "samples per insert"),
        ("sum by (kind) (reliev3r_replay_waiting_requests)", "waiting {{kind}}"),
    ]),
    panel("Learner step", [("max(reliev3r_learner_step)", "step")]),
    # Every learner rank exports its step rate, and the ranks step together: max, not sum.
    panel("Learner steps per second", [("max(reliev3r_learner_steps_per_second)", "steps/s")]),
    # A line per process (learner ranks, labelers: several of a stage): the legend names the instance.
    panel("Processes up", [("reliev3r_process_up", "{{stage}} {{instance}}"),
                           ("up{job=\"reliev3r\"}", "scrape {{component}} {{instance}}")]),
    panel("Process restarts", [
        ("changes(reliev3r_process_start_time_seconds[1h])", "starts {{stage}} {{instance}}"),
        ("sum by (stage) (reliev3r_process_restarts_total)" + ZERO, "supervisor restarts {{stage}}"),
    ], description="Start-time changes seen by Prometheus, and the supervisor's restart counter"),
])

LEARNER = dashboard("reliev3r-learner", "reliev3r / learner", [
    # A line per rank (the series carry no rank label): the legend names the rank's instance.
    panel("Loss by term", [("reliev3r_learner_loss", "{{term}} {{instance}}")]),
    panel("Gradient norm (before clipping)", [("reliev3r_learner_grad_norm", "grad norm {{instance}}")]),
    panel("Steps per second", [("reliev3r_learner_steps_per_second", "steps/s {{instance}}")]),
    # Each rank counts the windows of its own batches: the sum is the run's rate.
    panel("Samples per second", [("sum(rate(reliev3r_learner_samples_total[1m]))", "windows/s")], unit="ops"),
    # A rank's seconds per second are its share of wall time: average the ranks (a sum passes 100%).
    panel("Learner time: waiting for data / steps on the GPU", [
        ("avg(rate(reliev3r_learner_data_wait_seconds_total[1m]))", "waiting for data"),
        ("avg(rate(reliev3r_learner_step_gpu_seconds_total[1m]))", "steps on the GPU"),
    ], unit="percentunit", description="Shares of wall time, averaged over the learner's ranks: waiting for a batch "
                                       "with the GPU done, and the steps' spans on the GPU (first operation to last; "
                                       "longer than alone where other processes' kernels take turns with the "
                                       "learner's)"),
    # Under DDP the ranks skip a non-finite step together, each counting it: max, not sum.
    panel("Skipped (non-finite) steps",
          [("max(increase(reliev3r_learner_skipped_steps_total[10m]))", "skipped / 10m")]),
    panel("Model FLOPs utilisation (vs measured bf16 peak)", [("reliev3r_learner_mfu", "MFU {{instance}}")],
          unit="percentunit"),
    panel("Model FLOP/s and learning rate", [("sum(reliev3r_learner_model_flops_per_second)", "FLOP/s"),
                                             ("max(reliev3r_learner_lr)", "lr")]),
    panel("GPU memory", [("sum by (kind) (reliev3r_learner_gpu_memory_bytes)" + ZERO, "{{kind}}")], unit="bytes",
          description="Allocated and reserved by the learner's CUDA caching allocator (0 on CPU)"),
    panel("Snapshot age", [("time() - max(reliev3r_snapshot_timestamp_seconds)", "age")], unit="s"),
    panel("Steps since the last snapshot", [("max(reliev3r_learner_step) - max(reliev3r_snapshot_step)", "steps")]),
    panel("Snapshot write time", [
        ("max(reliev3r_snapshot_duration_seconds_sum / reliev3r_snapshot_duration_seconds_count)", "mean"),
        ("histogram_quantile(0.9, sum by (le) (reliev3r_snapshot_duration_seconds_bucket))", "p90"),
    ], unit="s"),
    panel("Evaluation: depth", [
        ("reliev3r_eval_metric{metric=~\"absrel_med|absrel_lsq|delta_med\"}", "{{metric}} {{model}}"),
    ]),
    panel("Evaluation: poses", [
        ("reliev3r_eval_metric{metric=~\"ate|rpe_trans|rra30|rta30|auc30\"}", "{{metric}} {{model}}"),
    ]),
    panel("Evaluated snapshot step / evaluation time", [
        ("reliev3r_eval_snapshot_step", "snapshot step"), ("reliev3r_eval_duration_seconds", "seconds"),
    ]),
])

QUALITY = dashboard("reliev3r-data-quality", "reliev3r / data quality", [
    panel("Decode errors by source and reason",
          [("sum by (source, reason) (rate(reliev3r_decode_errors_total[5m]))" + ZERO, "{{source}} {{reason}}")],
          unit="ops"),
    panel("Windows re-sent / abandoned", [
        ("sum(rate(reliev3r_windows_resent_total[5m]))", "re-sent"),
        ("sum(rate(reliev3r_windows_abandoned_total[5m]))", "abandoned"),
    ], unit="ops"),
    panel("Labeler outcomes",
          [("sum by (status) (rate(reliev3r_labeler_windows_total[5m]))", "{{status}}")], unit="ops"),
    panel("Labeler drops by reason",
          [("sum by (reason) (rate(reliev3r_labeler_dropped_total[5m]))" + ZERO, "{{reason}}")], unit="ops"),
    panel("Labeler quality flags", [("sum by (flag) (rate(reliev3r_labeler_flags_total[5m]))" + ZERO, "{{flag}}")],
          unit="ops"),
    panel("Verified matches per view pair", [
        ("histogram_quantile(0.1, sum by (le) (rate(reliev3r_matches_per_pair_bucket[5m])))", "p10"),
        ("histogram_quantile(0.5, sum by (le) (rate(reliev3r_matches_per_pair_bucket[5m])))", "median"),
        ("sum(rate(reliev3r_matches_per_pair_sum[5m])) / sum(rate(reliev3r_matches_per_pair_count[5m]))", "mean"),
    ]),
    panel("Labeler latency per stage (p90)", [
        ("histogram_quantile(0.9, sum by (le, stage) (rate(reliev3r_labeler_stage_seconds_bucket[5m])))", "{{stage}}"),
    ], unit="s", description="decode, depth (teacher) and matches per window"),
    panel("Labeler frames: features detected or reused", [
        ("sum by (features) (rate(reliev3r_labeler_frames_total[5m]))" + ZERO, "{{features}}"),
    ], unit="ops", description="SIFT/ORB features of a view met in an earlier window are reused, not detected again"),
    panel("Replay latency (p90)", [
        ("histogram_quantile(0.9, sum by (le) (rate(reliev3r_replay_insert_seconds_bucket[5m])))", "insert"),
        ("histogram_quantile(0.9, sum by (le) (rate(reliev3r_replay_sample_seconds_bucket[5m])))", "sample"),
    ], unit="s"),
    panel("Replay duplicates and rejections", [
        ("sum by (reason) (rate(reliev3r_replay_duplicates_total[5m]))" + ZERO, "duplicate {{reason}}"),
        ("sum by (reason) (rate(reliev3r_replay_rejected_total[5m]))" + ZERO, "rejected {{reason}}"),
        ("sum(rate(reliev3r_replay_corrupt_total[5m]))", "corrupt"),
    ], unit="ops"),
    panel("Messages rejected by reason", [
        ("sum by (stage, reason) (rate(reliev3r_messages_rejected_total[5m]))" + ZERO, "{{stage}} {{reason}}"),
        ("sum by (kind) (rate(reliev3r_replay_not_ready_total[5m]))" + ZERO, "replay not ready {{kind}}"),
    ], unit="ops"),
    panel("Peers refused by CURVE", [
        ("sum by (stage) (rate(reliev3r_auth_failures_total[5m]))" + ZERO, "{{stage}}"),
    ], unit="ops", description="Only exported by processes with network.curve enabled"),
])

DASHBOARDS = {"pipeline-overview.json": OVERVIEW, "learner.json": LEARNER, "data-quality.json": QUALITY}


def render() -> dict[str, str]:
    return {name: json.dumps(d, indent=2) + "\n" for name, d in DASHBOARDS.items()}


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)
