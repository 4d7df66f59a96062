"""Monitoring: `reliev3r status` against real metric endpoints, metric names through `promtool check metrics`."""

from __future__ import annotations

import json
import os
import threading

import pytest

from monitoring.metrics import Metrics
from reliev3r import cli, status
from reliev3r.config import free_port


@pytest.fixture()
def run_dir(tmp_path):
    stages = {s: Metrics(s) for s in ("supervisor", "streamer", "replay", "learner")}
    ports = {s: m.serve("127.0.0.1", free_port()) for s, m in stages.items()}
    st, rp, ln = stages["streamer"], stages["replay"], stages["learner"]
    frames = st.counter("decode_frames_total", "frames", ["source"])
    frames.labels("a.mp4").inc(5)
    frames.labels("b.mp4").inc(5)
    st.gauge("windows_in_flight", "in flight").set(3)
    rp.gauge("replay_windows", "stored").set(184)
    rp.gauge("replay_waiting_requests", "waiting", ["kind"]).labels("sample").set(1)
    step = ln.gauge("learner_step", "step")
    step.set(100)
    ln.gauge("learner_loss", "loss", ["term"]).labels("loss").set(0.25)
    processes = {s: {"pid": os.getpid(), "restarts": 0, "metrics": f"http://127.0.0.1:{p}/metrics"} for s, p in ports.items()}
    processes["learner"]["restarts"] = 2
    # A labeler whose process is gone and whose endpoint answers nothing.
    processes["labeler"] = {"pid": None, "restarts": 1, "metrics": f"http://127.0.0.1:{free_port()}/metrics"}
    (tmp_path / "processes.json").write_text(json.dumps(processes))
    (tmp_path / "evaluations").mkdir()
    for s, absrel in ((25, 0.5), (50, 0.125)):
        (tmp_path / "evaluations" / f"step-{s:09d}.json").write_text(json.dumps(
            {"step": s, "data": "synthetic", "model": {"absrel_med": absrel, "ate": 0.5}}))

    def bump():  # between the two scrapes of a 0.6 s interval
        frames.labels("a.mp4").inc(20)
        step.set(103)

    timer = threading.Timer(0.25, bump)
    yield tmp_path, timer
    timer.cancel()
    for m in stages.values():
        m.close()


def test_collect_rates_levels_and_liveness(run_dir):
    path, timer = run_dir
    timer.start()
    stages = status.collect(path, interval=0.6)
    assert list(stages) == ["supervisor", "streamer", "labeler", "replay", "learner"]
    st, lb, rp, ln = stages["streamer"], stages["labeler"], stages["replay"], stages["learner"]
    assert st.up and st.alive and st.pid == os.getpid()
    # 20 frames over the interval (0.6 s plus the second scrape's time).
    assert 20 / 1.2 < st.rates["frames"] <= 20 / 0.6
    assert 3 / 1.2 < ln.rates["steps"] <= 3 / 0.6
    assert st.levels["in flight"] == 3
    assert rp.levels == {"windows": 184, "waiting samples": 1}
    assert ln.levels["step"] == 103 and ln.levels["loss"] == 0.25 and ln.restarts == 2
    assert not lb.up and not lb.alive and lb.restarts == 1

    table = status.format_table(stages, status.latest_evaluation(path))
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["stage", "state", "pid", "restarts"]
    assert any(line.startswith("labeler") and " down " in line for line in lines)
    assert "windows 184" in table and "in flight 3" in table
    assert lines[-1] == "latest evaluation: step 50 on synthetic: AbsRel 0.125 ATE 0.5"


def test_status_command_exit_codes(run_dir, tmp_path_factory, capsys):
    path, _ = run_dir
    assert cli.main(["status", "--run-dir", str(path), "--interval", "0"]) == 1  # the labeler is down
    out = capsys.readouterr().out
    assert "learner" in out and "step 103" not in out and "step 100" in out
    empty = tmp_path_factory.mktemp("empty")
    assert cli.main(["status", "--run-dir", str(empty), "--interval", "0"]) == 2
    assert "no " in capsys.readouterr().out
