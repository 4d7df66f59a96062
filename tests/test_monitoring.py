"""Monitoring: `reliev3r status` against real metric endpoints, metric names through `promtool check metrics`."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from monitoring.metrics import Metrics
from reliev3r import cli, status
from reliev3r.config import free_port
from helpers_processes import running

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


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
    processes = {s: {"pid": os.getpid(), "restarts": 0, "metrics": f"http://127.0.0.1:{p}/metrics"}
                 for s, p in ports.items()}
    processes["learner"]["restarts"] = 2
    # A labeler whose process is gone and whose endpoint answers nothing.
    processes["labeler"] = {"pid": None, "restarts": 1, "metrics": f"http://127.0.0.1:{free_port()}/metrics"}
    (tmp_path / "processes.json").write_text(json.dumps(processes))
    (tmp_path / "evaluations").mkdir()
    for s, absrel in ((25, 0.5), (50, 0.125)):
        (tmp_path / "evaluations" / f"step-{s:09d}.json").write_text(json.dumps(
            {"step": s, "data": "synthetic", "model": {"absrel_med": absrel, "ate": 0.5}}))

    def bump():  # what the stages do between the two scrapes
        frames.labels("a.mp4").inc(20)
        step.set(103)

    yield tmp_path, bump
    for m in stages.values():
        m.close()


class _Clock:
    """``status``'s time: its sleep between the two scrapes runs ``between`` and advances the
    clock by exactly the interval, so the rates are exact whatever the machine's speed."""

    def __init__(self, between):
        self.now, self.between = 1000.0, between

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.between()
        self.now += seconds


def test_collect_rates_levels_and_liveness(run_dir, monkeypatch):
    path, bump = run_dir
    monkeypatch.setattr(status, "time", _Clock(bump))
    stages = status.collect(path, interval=0.6)
    assert list(stages) == ["supervisor", "streamer", "labeler", "replay", "learner"]
    st, lb, rp, ln = stages["streamer"], stages["labeler"], stages["replay"], stages["learner"]
    assert st.up and st.alive and st.pid == os.getpid()
    # 20 frames and 3 steps between the scrapes, 0.6 s apart.
    assert st.rates["frames"] == pytest.approx(20 / 0.6) and ln.rates["steps"] == pytest.approx(3 / 0.6)
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
    said = capsys.readouterr()
    assert said.out == "" and f"reliev3r status: no {empty / 'processes.json'}" in said.err  # it went to stdout


@pytest.mark.parametrize("value, said", [("-1", "must be a finite number >= 0, got -1.0"),
                                         ("nan", "must be a finite number >= 0, got nan"),
                                         ("inf", "must be a finite number >= 0, got inf"),
                                         ("soon", "invalid seconds value: 'soon'")])
def test_an_interval_that_is_negative_or_not_finite_is_refused_naming_it(tmp_path, capsys, value, said):
    """``status --interval -1`` was taken as 0 (one scrape, no rates), ``nan`` and ``inf`` too, or
    as a wait without end: refused naming the option, exit 2, before the run folder is read."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["status", "--run-dir", str(tmp_path), "--interval", value])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"argument --interval: {said}" in err, err


@pytest.mark.parametrize("content, problem", [("garbage\n", "not JSON"), ("[1, 2]\n", "not a mapping of stages"),
                                              ('{"learner": 3}\n', "not a mapping of stages")])
def test_status_of_a_run_whose_processes_json_is_damaged_says_so_in_a_line(tmp_path, capsys, content, problem):
    """A ``processes.json`` that is no JSON, or no mapping of stage to process: ``reliev3r status``
    says so on stderr naming the file, exit 2 as without a run. It ended in a Python traceback,
    exit 1 (JSONDecodeError, AttributeError)."""
    (tmp_path / "processes.json").write_text(content)
    assert cli.main(["status", "--run-dir", str(tmp_path), "--interval", "0"]) == 2
    said = capsys.readouterr()
    assert said.out == "" and "Traceback" not in said.err
    assert said.err.startswith(f"reliev3r status: {tmp_path / 'processes.json'}: {problem}"), said.err


def test_a_stage_held_for_a_teacher_refresh_is_not_down(run_dir, monkeypatch, capsys):
    """The supervisor holds the labelers, the evaluator and the learner stopped while a teacher
    refresh distils (``processes.json``: ``held``): ``reliev3r status`` says so, and a run whose
    other stages answer is healthy."""
    path, bump = run_dir
    processes = json.loads((path / "processes.json").read_text())
    processes["labeler"]["held"] = "teacher refresh"
    (path / "processes.json").write_text(json.dumps(processes))
    monkeypatch.setattr(status, "time", _Clock(bump))
    assert cli.main(["status", "--run-dir", str(path), "--interval", "0.1"]) == 0
    assert any(line.startswith("labeler") and "held (teacher refresh)" in line
               for line in capsys.readouterr().out.splitlines())


def test_one_metrics_port_override_keeps_the_others():
    """``monitoring.ports.learner=...`` sets that key of the mapping; the others keep theirs
    (from the dataclass default or a file), they are not dropped."""
    from monitoring.config import MonitoringConfig
    from reliev3r.config import build, load

    assert build(MonitoringConfig, {"ports": {"learner": 9999}}).ports == {**MonitoringConfig().ports, "learner": 9999}
    fixed = load([ROOT / "configs" / "default.yaml", DEPLOY / "prometheus" / "local-ports.yaml"],
                 ["monitoring.ports.learner=0"]).monitoring.ports
    assert fixed == {"supervisor": 9700, "streamer": 9701, "labeler": 9702, "replay": 9703, "evaluator": 9704,
                     "learner": 0}


def _supervisor(run_dir: Path):
    from reliev3r.config import load
    from reliev3r.supervisor import Supervisor

    return Supervisor(load([ROOT / "configs" / "default.yaml"], [f"run.dir={run_dir}"]), out=io.StringIO())


def test_ranks_of_one_host_serve_their_metrics_on_the_fixed_port_plus_their_local_rank(monkeypatch):
    """``torchrun --nproc-per-node N ... learn`` with ``monitoring.ports.learner`` fixed: rank k
    serves on that port + k (every rank bound the one port: rank 1 failed, torchrun ended the
    job); a port of 0 stays a free one."""
    from reliev3r.config import load
    from reliev3r.service import Runtime

    base = free_port()
    while True:  # base + 1 free too
        try:
            with socket.create_server(("127.0.0.1", base + 1)):
                break
        except OSError:
            base = free_port()
    cfg = load(overrides=[f"monitoring.ports.learner={base}", "monitoring.host=127.0.0.1"])
    monkeypatch.setenv("LOCAL_RANK", "0")
    with Runtime("learner", cfg, install_signals=False, serve_metrics=True) as first:
        monkeypatch.setenv("LOCAL_RANK", "1")
        with Runtime("learner", cfg, install_signals=False, serve_metrics=True) as second:
            assert (first.metrics_port, second.metrics_port) == (base, base + 1)
            for port in (base, base + 1):
                assert b"reliev3r_" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    with Runtime("learner", load(overrides=["monitoring.host=127.0.0.1"]), install_signals=False,
                 serve_metrics=True) as free:
        assert free.metrics_port not in (0, 1)


def _free_block(size: int) -> int:
    """The first of ``size`` consecutive ports free on 127.0.0.1 (checked by binding each)."""
    while True:
        base = free_port()
        held = []
        try:
            for port in range(base, base + size):
                held.append(socket.create_server(("127.0.0.1", port)))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()


LOCAL_PORTS = [ROOT / "configs" / "default.yaml", DEPLOY / "prometheus" / "local-ports.yaml"]


def test_the_shipped_fixed_ports_give_every_process_of_one_host_its_own_port(monkeypatch, tmp_path):
    """deploy/prometheus/local-ports.yaml on one host with the learner under ``torchrun
    --nproc-per-node 4``: each rank serves on the learner's port plus its LOCAL_RANK, none of
    them another process's (learner 9704 and evaluator 9705: rank 1 found 9705 taken, or took
    it from the evaluator). Also ``up`` with three labelers: the extra ones get free ports. The
    layout is moved to a block of free ports (9700 may be held on a test host)."""
    from reliev3r.config import load
    from reliev3r.ports import stage_problem
    from reliev3r.service import Runtime
    from reliev3r.supervisor import Supervisor

    shipped = load(LOCAL_PORTS).monitoring.ports
    ranks, low = 4, min(shipped.values())
    span = max(shipped.values()) - low + ranks
    base = _free_block(span + 2)  # the two ZeroMQ ports of the stages on their own above it
    moved = [f"monitoring.ports.{key}={port - low + base}" for key, port in shipped.items()]
    moved += [f"network.work_port={base + span}", f"network.replay_port={base + span + 1}"]
    cfg = load(LOCAL_PORTS, [*moved, "monitoring.host=127.0.0.1"])
    monkeypatch.delenv("RELIEV3R_INSTANCE", raising=False)
    served: dict[str, int] = {}
    supervisor = Metrics("supervisor")
    try:
        served["supervisor"] = supervisor.serve("127.0.0.1", cfg.monitoring.ports["supervisor"])
        runtimes = []
        try:
            for stage in ("streamer", "labeler", "replay", "evaluator"):
                assert stage_problem(stage, stage, cfg) is None
                runtimes.append(Runtime(stage, cfg, install_signals=False, serve_metrics=True))
                served[stage] = runtimes[-1].metrics_port
            for rank in range(ranks):
                monkeypatch.setenv("LOCAL_RANK", str(rank))
                assert stage_problem("learner", "learner", cfg) is None, rank
                runtimes.append(Runtime("learner", cfg, install_signals=False, serve_metrics=True))
                served[f"learner rank {rank}"] = runtimes[-1].metrics_port
        finally:
            for runtime in runtimes:
                runtime.close()
    finally:
        supervisor.close()
    assert len(set(served.values())) == len(served) == 5 + ranks, served
    assert served["learner rank 0"] == cfg.monitoring.ports["learner"]
    monkeypatch.delenv("LOCAL_RANK")
    sup = Supervisor(load(LOCAL_PORTS, [*moved, f"run.dir={tmp_path}", "labeler.workers=3"]), out=io.StringIO())
    try:
        metrics = {key: port for key, port in sup.ports.items() if key.startswith("monitoring.")}
        assert len(metrics) == 8 and len(set(metrics.values())) == 8, metrics
    finally:
        sup.metrics.close()


def test_a_learner_rank_whose_port_is_another_process_s_is_refused_naming_both(monkeypatch):
    """A fixed layout of one host where the learner's port plus a LOCAL_RANK is another
    process's: the rank started second is refused naming both keys and the port. A rank checks
    its own port (its LOCAL_RANK's), not rank 0's: rank 1 was refused because rank 0 had bound
    the learner's port, "another reliev3r run or program holds it"."""
    from reliev3r.config import load
    from reliev3r.ports import stage_problem
    from reliev3r.service import Runtime

    base = _free_block(3)
    cfg = load(overrides=[f"monitoring.ports.learner={base}", f"monitoring.ports.evaluator={base + 1}",
                          f"network.replay_port={base + 2}", "monitoring.host=127.0.0.1"])
    monkeypatch.delenv("RELIEV3R_INSTANCE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with Runtime("learner", cfg, install_signals=False, serve_metrics=True):
        monkeypatch.setenv("LOCAL_RANK", "1")
        assert stage_problem("learner", "learner", cfg) is None  # its own port, base + 1, is free
        with Runtime("evaluator", cfg, install_signals=False, serve_metrics=True):
            problem = stage_problem("learner", "learner", cfg)
        assert problem is not None and f"port {base + 1}" in problem, problem
        assert f"monitoring.ports.learner ({base}) + LOCAL_RANK 1" in problem, problem
        assert "monitoring.ports.evaluator" in problem, problem
        # The other order: the learner's rank 1 holds the evaluator's port, the evaluator is refused.
        with Runtime("learner", cfg, install_signals=False, serve_metrics=True):
            monkeypatch.delenv("LOCAL_RANK")
            problem = stage_problem("evaluator", "evaluator", cfg)
    assert problem is not None and f"monitoring.ports.evaluator: port {base + 1}" in problem, problem
    assert f"monitoring.ports.learner ({base}) + LOCAL_RANK 1" in problem, problem


@pytest.mark.parametrize("value", ["-1", "one"])
def test_a_local_rank_that_is_no_rank_is_refused_alike_for_the_learner_s_gpu_and_its_metrics_port(
        monkeypatch, capsys, value):
    """A learner rank's ``LOCAL_RANK`` picks its GPU (``learner.device=cuda``) and its metrics
    port, read by one reader: a value that is no rank is refused naming the variable, by both.
    Before, each read it on its own: ``one`` stopped with int()'s bare ``invalid literal`` (a
    traceback of ``reliev3r learn``), and ``-1`` put the model on cuda:-1 and the metrics on the
    port below the learner's (another process's)."""
    from learner.train import resolve_device

    base = _free_block(3)
    monkeypatch.delenv("RELIEV3R_SUPERVISED", raising=False)
    monkeypatch.delenv("RELIEV3R_INSTANCE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", value)
    with pytest.raises(ValueError, match=f"LOCAL_RANK must be a rank .* got '{value}'"):
        resolve_device("cuda")
    with socket.create_server(("127.0.0.1", base)):  # the port below the learner's: another process's
        code = cli.main(["learn", f"monitoring.ports.learner={base + 1}", f"network.replay_port={base + 2}",
                         "monitoring.host=127.0.0.1"])
    err = capsys.readouterr().err
    assert code == 2 and f"LOCAL_RANK must be a rank" in err and f"got '{value}'" in err, err


def test_labelers_started_by_hand_on_one_host_are_told_the_override_that_gives_each_its_port(monkeypatch, capsys):
    """Three ``reliev3r label`` on one host with a fixed ``monitoring.ports.labeler``: the second
    is refused, and the refusal says that each labeler of the host needs its own port and which
    override gives it one (it said "another reliev3r run or program holds it", as for a port
    of another run); started with that override, each serves on its own port."""
    from reliev3r.config import load
    from reliev3r.ports import stage_problem
    from reliev3r.service import Runtime

    base = _free_block(5)
    common = [f"network.work_port={base + 3}", f"network.replay_port={base + 4}", "monitoring.host=127.0.0.1"]
    monkeypatch.delenv("RELIEV3R_SUPERVISED", raising=False)
    monkeypatch.delenv("RELIEV3R_INSTANCE", raising=False)
    runtimes = []
    try:
        for k in range(3):
            told = [f"monitoring.ports.labeler={base + k}"] if k else []  # the first takes the shared config's
            cfg = load(overrides=[f"monitoring.ports.labeler={base}", *common, *told])
            assert stage_problem("labeler", "labeler", cfg) is None, k
            runtimes.append(Runtime("labeler", cfg, install_signals=False, serve_metrics=True))
            if k == 0:
                assert cli.main(["label", f"monitoring.ports.labeler={base}", *common]) == 2
                err = capsys.readouterr().err
                assert f"monitoring.ports.labeler: port {base} on 127.0.0.1 is already in use" in err, err
                assert "another labeler of this host" in err, err
                assert "each labeler of one host needs its own metrics port" in err, err
                assert "monitoring.ports.labeler=<another port>" in err, err
        assert [r.metrics_port for r in runtimes] == [base, base + 1, base + 2]
    finally:
        for runtime in runtimes:
            runtime.close()


TORCHRUN_JOB = {"LOCAL_RANK": "3", "RANK": "7", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
               "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "7", "ROLE_WORLD_SIZE": "8", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": "29500"}
"""What torchrun gives rank 7 of a job of two hosts of four ranks."""


def test_up_s_children_are_no_torchrun_ranks_whatever_environment_up_was_started_in(monkeypatch, tmp_path):
    """``reliev3r up`` started where torchrun's variables are set (inside a torchrun job, or a
    shell that exported LOCAL_RANK) starts its children as single processes of its host: they
    inherited LOCAL_RANK, and its learner served its metrics on its port plus LOCAL_RANK, not on
    the port ``up`` resolved for it (and listed in processes.json). Checked on the environment
    ``up`` gives its children (stages and the teacher refresh's distillation alike) and on the
    port a child serves with it, in a real process."""
    for name, value in TORCHRUN_JOB.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RELIEV3R_TEST_KEPT", "kept")  # anything else is the children's as it is up's
    sup = _supervisor(tmp_path)
    try:
        envs = [sup.child_environment(), sup.child_environment("learner")]
    finally:
        sup.metrics.close()
    for env in envs:
        assert not set(TORCHRUN_JOB) & set(env), sorted(set(TORCHRUN_JOB) & set(env))
        assert env["RELIEV3R_TEST_KEPT"] == "kept" and env["RELIEV3R_SUPERVISED"] == str(os.getpid())
    assert envs[1]["RELIEV3R_INSTANCE"] == "learner"
    base = _free_block(int(TORCHRUN_JOB["LOCAL_RANK"]) + 1)  # free up to base + LOCAL_RANK: no bind fails
    code = (f"from reliev3r.config import load\nfrom reliev3r.service import Runtime\n"
            f"cfg = load(overrides=['monitoring.ports.learner={base}', 'monitoring.host=127.0.0.1'])\n"
            f"with Runtime('learner', cfg, install_signals=False, serve_metrics=True) as runtime:\n"
            f"    print(runtime.metrics_port)\n")
    done = subprocess.run([sys.executable, "-c", code], env=envs[1], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == base, done.stdout


def test_final_status_line_shows_the_step_and_evaluation_the_run_ended_with(tmp_path):
    """The heartbeats the status line shows are up to a second old, and a child's last one can
    be lost as it exits: the last line reads the final snapshot and evaluation from the run."""
    sup = _supervisor(tmp_path)
    try:
        sup.children["learner"].status = {"step": 19, "loss": 0.5}
        sup.children["evaluator"].status = {"step": 15, "absrel_med": 0.4, "ate": 0.2}
        final = tmp_path / "snapshots" / "step-000000020"
        final.mkdir(parents=True)
        (final / "meta.json").write_text(json.dumps({"step": 20, "final": True}))
        (tmp_path / "snapshots" / "step-000000025.tmp-1").mkdir()  # being written: not a snapshot yet
        (tmp_path / "evaluations").mkdir()
        (tmp_path / "evaluations" / "step-000000020.json").write_text(json.dumps(
            {"step": 20, "model": {"absrel_med": 0.25, "ate": 0.125}}))
        running = sup.status_line()  # from the heartbeats
        assert "| step 19 |" in running and "eval@15 AbsRel 0.400 ATE 0.200" in running, running
        sup._print_status(final=True)
        line = sup.out.getvalue().splitlines()[-1]
        assert "| step 20 |" in line and "eval@20 AbsRel 0.250 ATE 0.125" in line, line
    finally:
        sup.metrics.close()


def test_the_status_line_says_which_stage_cannot_write_and_why(tmp_path):
    """A stage whose writes the disk refuses (full, an I/O error) goes on without them: a learner
    that cannot write its snapshots trains on, unsaved. The status line said nothing of it; it now
    names each such stage and what it could not write, until the stage writes again; an evaluator
    whose data the disk refuses to read is named apart, as a read."""
    sup = _supervisor(tmp_path)
    try:
        assert "writes refused" not in sup.status_line()
        sup.children["learner"].status = {"step": 4, "write_error": "snapshot of step 4: ENOSPC: No space left"}
        sup.children["replay"].status = {"stored": 9, "write_error": "inserts: database or disk is full"}
        line = sup.status_line()
        assert ("writes refused (replay: inserts: database or disk is full; "
                "learner: snapshot of step 4: ENOSPC: No space left)") in line, line
        sup.children["evaluator"].status = {"read_error": "evaluation data 7scenes:/d: EIO: Input/output error"}
        line = sup.status_line()  # a read the disk refuses is no refused write
        assert "| reads refused (evaluator: evaluation data 7scenes:/d: EIO: Input/output error)" in line, line
        assert "writes refused (replay: inserts: database or disk is full; learner: snapshot" in line, line
        sup.children["learner"].status = {"step": 6}
        sup.children["replay"].status = {"stored": 10}
        sup.children["evaluator"].status = {}
        assert "writes refused" not in sup.status_line() and "reads refused" not in sup.status_line()
    finally:
        sup.metrics.close()


def test_a_full_disk_does_not_end_the_supervisor_nor_touch_the_logs_it_could_not_rotate(tmp_path, small_disk,
                                                                                        monkeypatch):
    """The supervisor writes processes.json when a child starts or dies, and rotates the children's
    logs: on a full disk either write raised out of its loop, which stopped every child, ending a
    run that would have gone on once space was freed. A rotation that failed part way had also
    shifted the rotated logs one up already (the oldest lost) and left a part of ``log.1``. Both
    now say the failure and leave what was there as it was; both work again once there is room."""
    from reliev3r import supervisor

    disk = small_disk(8 << 20)
    monkeypatch.setattr(supervisor, "LOG_BYTES", 1 << 20)
    (disk.path / "run").mkdir()
    sup = _supervisor(disk.path / "run")
    try:
        sup._write_pids()
        before = (disk.path / "run" / "processes.json").read_text()
        logs = disk.path / "run" / "logs"
        logs.mkdir()
        log = logs / "learner.log"
        log.write_bytes(b"x" * (2 << 20))
        (logs / "learner.log.1").write_text("older\n")
        (logs / "learner.log.2").write_text("oldest\n")
        disk.fill()
        sup.children["learner"].restarts = 1  # what processes.json would say now
        sup._write_pids()
        sup._rotate_logs()
        sup._rotate_logs()  # the loop tries again: nothing moves either
        said = sup.out.getvalue()
        assert "processes.json not written" in said and "learner.log not rotated" in said, said
        assert said.count("learner.log not rotated") == 1  # said once while it keeps failing alike
        assert os.strerror(errno.ENOSPC) in said
        assert (disk.path / "run" / "processes.json").read_text() == before
        assert sorted(p.name for p in (disk.path / "run").iterdir()) == ["logs", "processes.json"]
        assert sorted(p.name for p in logs.iterdir()) == ["learner.log", "learner.log.1", "learner.log.2"]
        assert (logs / "learner.log.1").read_text() == "older\n" and log.stat().st_size == 2 << 20
        disk.free()
        sup._write_pids()
        assert json.loads((disk.path / "run" / "processes.json").read_text())["learner"]["restarts"] == 1
        sup._rotate_logs()
        assert log.stat().st_size == 0 and (logs / "learner.log.1").stat().st_size == 2 << 20
        assert (logs / "learner.log.2").read_text() == "older\n" and (logs / "learner.log.3").read_text() == "oldest\n"
    finally:
        sup.metrics.close()


@pytest.mark.parametrize("argv, off", [(["pretrain"], False), (["up", "labeler.teacher=none"], True),
                                        (["up", "labeler.teacher=none", "learner.loss.kind=supervised"], False),
                                        (["up"], False)])
def test_the_depth_loss_is_said_off_only_where_the_loss_has_no_depth_term(tmp_path, argv, off):
    """``labeler.teacher=none`` leaves the weak loss without its depth term; the supervised loss
    (``reliev3r pretrain``) trains depth on the ground truth, with no teacher: its start line and
    every status line said "depth loss off" all the same."""
    from reliev3r.supervisor import Supervisor

    cfg = cli.load_config(cli.parse_args([*argv, f"run.dir={tmp_path}"]))
    sup = Supervisor(cfg, out=io.StringIO())
    try:
        assert ("depth loss off" in sup.status_line()) is off, sup.status_line()
        assert ("depth loss off" in sup.start_line()) is off, sup.start_line()
        assert f"teacher {cfg.labeler.teacher}" in sup.start_line()
    finally:
        sup.metrics.close()


@pytest.mark.timeout(120)  # bounds a hang only
def test_counts_in_the_status_line_survive_a_restart_and_ignore_the_dead_process(tmp_path):
    """A process counts from 0: the status line adds what a stage's earlier incarnations
    counted, and a heartbeat of one that is gone (its pid) changes nothing. The real labeler
    (a teacher file that is not there: it dies at start), reaped and started again by the supervisor."""
    import zmq

    from reliev3r import config as rconfig
    from reliev3r import protocol
    from reliev3r.supervisor import Supervisor

    cfg = rconfig.load([ROOT / "configs" / "default.yaml"],
                       [f"run.dir={tmp_path}", f"labeler.teacher=onnx:{tmp_path / 'bogus.onnx'}?space=depth"])
    sup = Supervisor(cfg, out=io.StringIO())
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    try:
        (tmp_path / "logs").mkdir()
        sup.config_file = tmp_path / "config.yaml"
        sup.config_file.write_text(yaml.safe_dump(rconfig.to_dict(sup.cfg), sort_keys=False))
        port = pull.bind_to_random_port("tcp://127.0.0.1")
        push.connect(f"tcp://127.0.0.1:{port}")

        def beat(pid: int, **status) -> None:
            push.send_multipart(protocol.encode(protocol.Message("heartbeat", {"stage": "labeler", "pid": pid,
                                                                               "status": status})))
            sup._drain_heartbeats(pull, 5000)

        for child in sup.children.values():
            child.finished = child.stage != "labeler"
        labeler = sup.children["labeler"]
        sup._reap_and_restart()
        first = labeler.proc.pid
        beat(first, labelled=5, dropped=1)
        assert "labelled 5 dropped 1" in sup.status_line()
        deadline = time.time() + 90
        while (labeler.proc is None or labeler.proc.pid == first) and time.time() < deadline:
            sup._reap_and_restart()
            time.sleep(0.1)
        assert labeler.restarts == 1 and labeler.proc.pid != first, sup.out.getvalue()
        beat(labeler.proc.pid, labelled=2, dropped=0)
        assert "labelled 7 dropped 1" in sup.status_line()
        beat(first, labelled=6, dropped=1)  # the dead one's last beat, late: not counted again
        assert "labelled 7 dropped 1" in sup.status_line()
        labeler.proc.kill()
        labeler.proc.wait()
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()
        sup.metrics.close()


@pytest.mark.parametrize("device, gpus, expected", [
    ("cuda", 1, ["cuda:0", "cuda:0", "cuda:0"]),  # several labelers share the one GPU
    ("cuda", 2, ["cuda:0", "cuda:1", "cuda:0"]),
    ("cpu", 2, [None, None, None]),
])
def test_labelers_take_the_hosts_gpus_in_turn(device, gpus, expected):
    from reliev3r.config import load
    from reliev3r.supervisor import Supervisor

    cfg = load([ROOT / "configs" / "default.yaml"], [f"labeler.device={device}", "labeler.workers=3"])
    labelers = [c for c in Supervisor._plan(cfg, gpus=gpus) if c.stage == "labeler"]
    assert [c.name for c in labelers] == ["labeler", "labeler-1", "labeler-2"]
    assert [c.overrides[0].removeprefix("labeler.device=") if c.overrides else None for c in labelers] == expected


def _refresh_supervisor(run_dir: Path, *extra: str):
    from reliev3r.config import load
    from reliev3r.supervisor import Supervisor

    cfg = load([ROOT / "configs" / "default.yaml"],
               [f"run.dir={run_dir}", "labeler.refresh_step=6", "streamer.sources=[/data/clips]", *extra])
    return Supervisor(cfg, out=io.StringIO())


def test_a_resumed_run_labels_with_the_teacher_its_refresh_made(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "embedded_depth.safetensors").write_bytes(b"weights")
    sup = _refresh_supervisor(tmp_path, "labeler.workers=2")
    try:  # the weights without their meta (written last): a refresh cut short, not taken
        assert all("labeler.teacher" not in " ".join(c.overrides) for c in sup.children.values())
    finally:
        sup.metrics.close()
    (tmp_path / "teacher" / "embedded_depth.json").write_text("{}")
    sup = _refresh_supervisor(tmp_path, "labeler.workers=2")
    try:
        labelers = [c for c in sup.children.values() if c.stage == "labeler"]
        assert len(labelers) == 2 and all(
            c.overrides[-1] == f"labeler.teacher=embedded:{tmp_path / 'teacher' / 'embedded_depth.safetensors'}"
            for c in labelers)
        assert all(not c.overrides for c in sup.children.values() if c.stage != "labeler")
    finally:
        sup.metrics.close()


def _environ_once_started(proc: subprocess.Popen) -> list[bytes]:
    """The environment ``proc`` runs with, read from /proc once it has started its own program:
    read at once, it could still be the forked copy of this process's (before its exec) or, read
    during the exec, empty. Waits for its command line to change from this process's (bounded
    only to catch a hang); the process, a Python start-up with its imports, lives far longer."""
    ours = Path("/proc/self/cmdline").read_bytes()
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        except FileNotFoundError:
            break
        if cmdline and cmdline != ours and environ:
            return environ.split(b"\0")
        assert proc.poll() is None, "the process ended before its environment could be read"
        time.sleep(0.005)
    raise AssertionError(f"process {proc.pid} did not start its program within {HANG_S} s")


@pytest.mark.timeout(300)  # bounds a hang only
def test_a_failed_teacher_refresh_is_reported_and_the_labelers_keep_their_teacher(tmp_path):
    """The refresh runs the real ``reliev3r teacher-train --distill`` on the run: here its
    snapshot is unreadable, so the distillation fails, and the run goes on as it was."""
    sup = _refresh_supervisor(tmp_path)
    try:
        (tmp_path / "logs").mkdir()
        sup._refresh_teacher()
        assert sup._refresh == "waiting"  # no snapshot of step 6 yet
        (tmp_path / "snapshots" / "step-000000006").mkdir(parents=True)
        (tmp_path / "snapshots" / "step-000000006" / "meta.json").write_text("{not json")
        sup._refresh_teacher()
        assert sup._refresh == "distilling" and "distilling the learner" in sup.out.getvalue()
        # it ends with the supervisor, even a SIGKILLed one (die_with_supervisor, read while it starts)
        assert f"RELIEV3R_SUPERVISED={os.getpid()}".encode() in _environ_once_started(sup._distill)
        held = {k: v["held"] for k, v in json.loads((tmp_path / "processes.json").read_text()).items()
                if k != "supervisor"}
        assert held == {"streamer": None, "replay": None, "labeler": "teacher refresh",
                        "learner": "teacher refresh", "evaluator": "teacher refresh"}, held
        # held while it distils, with the labelers and the evaluator (their work would be thrown away)
        assert all(c.next_start == math.inf for c in sup.children.values() if c.stage != "streamer"
                   and c.stage != "replay")
        deadline = time.time() + 240
        while sup._refresh == "distilling" and time.time() < deadline:
            time.sleep(0.2)
            sup._refresh_teacher()
        assert sup._refresh == "failed", sup.out.getvalue()
        assert "teacher refresh failed (exit code 2: reliev3r teacher-train:" in sup.out.getvalue()
        assert "no valid snapshot there" in sup.out.getvalue() and "the learner resumes" in sup.out.getvalue()
        # _reap_and_restart starts them again, the labelers on their teacher
        assert all(c.next_start == 0.0 for c in sup.children.values())
        assert all(not c.overrides for c in sup.children.values())
    finally:
        sup.metrics.close()


def test_the_run_before_a_refresh_is_evaluated_with_the_runs_config(tmp_path, monkeypatch):
    """A done refresh moves the first part's snapshots to ``before-refresh/``, a folder that
    ``eval`` and ``view`` take for a run of its own; it had no ``config.yaml``, so ``eval`` of
    such a snapshot scored at the command's defaults (4 views, 8 windows of the default
    synthetic world, rendered again into ``before-refresh/``), not at the run's."""
    from reliev3r import config as rconfig
    from reliev3r.synthetic import ensure_world
    from streamer.config import SyntheticConfig
    from tests.tiny_snapshot import make_tiny_snapshot

    data = tmp_path / "mine"
    ensure_world(data, SyntheticConfig(scenes=1, frames=24, height=48, width=64), progress=False)
    run = tmp_path / "run"
    sup = _refresh_supervisor(run, "streamer.views=3", f"evaluator.data=synthetic:{data}", "evaluator.windows=2",
                              "evaluator.stride=2")
    try:
        run.mkdir()
        sup.config_file = run / "config.yaml"  # as run() writes it
        sup.config_file.write_text(yaml.safe_dump(rconfig.to_dict(sup.cfg), sort_keys=False))
        snap = make_tiny_snapshot(run)
        (run / "teacher").mkdir()
        (run / "teacher" / "embedded_depth.safetensors").write_bytes(b"weights")
        (run / "teacher" / "embedded_depth.json").write_text("{}")
        sup._distill = subprocess.Popen([sys.executable, "-c", "pass"])
        sup._distill.wait()
        sup._refresh = "distilling"
        monkeypatch.setattr(sup, "_start", lambda child: None)  # the stages are not what is tested
        sup._refresh_teacher()
        assert sup._refresh == "done" and not (run / "snapshots").exists(), sup.out.getvalue()
    finally:
        sup.metrics.close()
    moved = run / "before-refresh" / "snapshots" / snap.name
    assert cli.main(["eval", "--checkpoint", str(moved), "--teacher", "none", f"run.dir={tmp_path / 'default'}"]) == 0
    result = json.loads((run / "before-refresh" / "eval" / "results.json").read_text())
    assert (result["data"], result["views"], len(result["windows"]), result["stride"]) == (
        f"synthetic:{data}", 3, 2, 2)


@pytest.mark.timeout(120)  # bounds a hang only
def test_a_process_the_supervisor_starts_dies_when_the_supervisor_is_sigkilled():
    """``die_with_supervisor`` (every stage, and a teacher refresh's distillation, each in a
    session of its own): the kernel ends the process when the supervisor dies, even by SIGKILL."""
    child = ("import os, time; from reliev3r.service import die_with_supervisor; die_with_supervisor(); "
             "print(os.getpid(), flush=True); time.sleep(600)")
    supervisor = ("import os, subprocess, sys, time; env = {**os.environ, 'RELIEV3R_SUPERVISED': str(os.getpid())}; "
                  f"subprocess.Popen([sys.executable, '-c', {child!r}], env=env, start_new_session=True); "
                  "time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", supervisor], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    assert running(pid)
    parent.kill()
    parent.wait()
    deadline = time.time() + 60
    while running(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not running(pid)


def test_a_refresh_still_distilling_when_the_run_ends_is_stopped_and_said(tmp_path):
    sup = _refresh_supervisor(tmp_path)
    try:
        sup._distill = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
        sup._refresh = "distilling"
        sup._stop_all()
        assert sup._distill.returncode == -signal.SIGKILL
        assert "teacher refresh cut short: the run stopped while it distilled" in sup.out.getvalue()
    finally:
        sup.metrics.close()


def _distilled_run(run_dir: Path, sup) -> None:
    """A run folder as a refresh leaves it once its teacher is whole: the first part (a snapshot
    of step 6, its evaluation, a replay store), the teacher (meta last) and ``sup``'s config."""
    for folder, name in (("snapshots/step-000000006", "meta.json"), ("evaluations", "step-000000006.json"),
                         ("replay", "replay.sqlite"), ("teacher", "embedded_depth.safetensors"),
                         ("teacher", "embedded_depth.json")):
        (run_dir / folder).mkdir(parents=True, exist_ok=True)
        (run_dir / folder / name).write_text("{}")
    sup.config_file = run_dir / "config.yaml"  # as run() writes it
    sup.config_file.write_text("run: {}\n")


@pytest.mark.parametrize("distiller", ["running", "exited"])
def test_a_run_stopped_once_its_new_teacher_is_whole_finishes_the_refresh(tmp_path, distiller):
    """Stopped after the distillation wrote the whole teacher (its meta last), while the child
    still exits or before the supervisor saw it exit: the teacher is the refresh's, so the stop
    finishes the refresh (the first part moved into ``before-refresh/``, its config last) and
    says so, instead of "cut short ... no new teacher" with nothing moved, which left the
    resumed run's learner going on from the first one's snapshot on the new teacher."""
    sup = _refresh_supervisor(tmp_path)
    try:
        _distilled_run(tmp_path, sup)
        code = "import time; time.sleep(600)" if distiller == "running" else "pass"
        sup._distill = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
        if distiller == "exited":
            sup._distill.wait()
        sup._refresh = "distilling"
        sup._stop_all()
        out = sup.out.getvalue()
        assert "cut short" not in out, out
        before = tmp_path / "before-refresh"
        assert (f"teacher refresh: the new teacher {sup.teacher_file} was written before the run stopped; the run "
                f"before it is in {before}, and resumed, the learner starts afresh on it with an empty replay") in out
        assert sup._refresh == "done"
        for name in ("snapshots/step-000000006/meta.json", "evaluations/step-000000006.json", "replay/replay.sqlite"):
            assert (before / name).is_file() and not (tmp_path / name).exists(), name
        assert (before / "config.yaml").read_text() == "run: {}\n"
    finally:
        sup.metrics.close()


def test_a_distillation_that_exits_non_zero_after_writing_a_whole_teacher_is_a_done_refresh(tmp_path, monkeypatch):
    """A distillation child that exits non-zero once its teacher is whole (weights, then the meta
    that marks it whole and records the weights' digest) made that teacher all the same: a resumed
    run takes it for a done refresh, so the live run does too (the exit code said), instead of
    calling it failed, the labelers on the old teacher and the learner going on, which the next
    start would then undo by moving that learner's part into ``before-refresh/``."""
    sup = _refresh_supervisor(tmp_path, "labeler.workers=2")
    try:
        _distilled_run(tmp_path, sup)
        sup._distill = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        sup._distill.wait()
        sup._refresh = "distilling"
        monkeypatch.setattr(sup, "_start", lambda child: None)  # the stages are not what is tested
        sup._refresh_teacher()
        out = sup.out.getvalue()
        assert sup._refresh == "done" and "failed" not in out, out
        assert f"new teacher {sup.teacher_file} (the distillation exited with code 3 after writing it)" in out, out
        labelers = [c for c in sup.children.values() if c.stage == "labeler"]
        assert len(labelers) == 2 and all(
            c.overrides[-1] == f"labeler.teacher=embedded:{sup.teacher_file}" for c in labelers)
        before = tmp_path / "before-refresh"
        for name in ("snapshots/step-000000006/meta.json", "evaluations/step-000000006.json", "replay/replay.sqlite"):
            assert (before / name).is_file() and not (tmp_path / name).exists(), name
        assert (before / "config.yaml").read_text() == "run: {}\n"
    finally:
        sup.metrics.close()


def test_a_distillation_that_exits_non_zero_before_its_teacher_is_whole_is_a_failed_refresh(tmp_path):
    sup = _refresh_supervisor(tmp_path)
    try:
        (tmp_path / "snapshots" / "step-000000006").mkdir(parents=True)
        (tmp_path / "teacher").mkdir()
        (tmp_path / "teacher" / "embedded_depth.safetensors").write_bytes(b"weights")  # no meta: not whole
        (tmp_path / "logs").mkdir()
        (tmp_path / "logs" / "distill.log").write_text("out of memory\n")
        sup._distill = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        sup._distill.wait()
        sup._refresh = "distilling"
        sup._refresh_teacher()
        assert sup._refresh == "failed"
        assert "teacher refresh failed (exit code 3: out of memory)" in sup.out.getvalue()
        assert (tmp_path / "snapshots" / "step-000000006").is_dir() and not (tmp_path / "before-refresh").exists()
        assert all(not c.overrides for c in sup.children.values())
    finally:
        sup.metrics.close()


def test_a_failed_refresh_quotes_its_own_last_line_not_an_earlier_refresh_s(tmp_path):
    """A distillation that dies without an error line is said by its exit code and the last line
    it wrote, read from where it began in ``distill.log``: a line an earlier refresh wrote there
    is not this one's reason, nor is a line before a long tail read whole to find it."""
    from reliev3r.supervisor import TAIL_BYTES

    sup = _refresh_supervisor(tmp_path)
    try:
        (tmp_path / "snapshots" / "step-000000006").mkdir(parents=True)
        (tmp_path / "logs").mkdir()
        earlier = "an earlier refresh's last words\n" + "x" * (2 * TAIL_BYTES) + "\n"
        (tmp_path / "logs" / "distill.log").write_text(earlier)
        for written, said in (("", "teacher refresh failed (exit code 3)"),
                              ("step 5\nkilled by the kernel\n", "teacher refresh failed (exit code 3: killed by")):
            sup._distill_offset = (tmp_path / "logs" / "distill.log").stat().st_size
            with open(tmp_path / "logs" / "distill.log", "a") as log:
                log.write(written)
            sup._distill = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
            sup._distill.wait()
            sup._refresh = "distilling"
            sup.out = io.StringIO()
            sup._refresh_teacher()
            out = sup.out.getvalue()
            assert sup._refresh == "failed" and said in out and "earlier refresh" not in out, out
            assert "xxx" not in out, out
    finally:
        sup.metrics.close()


def test_a_refresh_that_cannot_move_its_first_part_aside_stops_up_before_anything_starts(tmp_path, capsys):
    """A whole teacher, its move not complete, and a part both in the run folder and in
    ``before-refresh/`` (put there by hand, or a learner that went on): ``up`` says which and
    exits 2, starting nothing and moving nothing, rather than overwrite either."""
    for folder in ("snapshots/step-000000006", "evaluations", "before-refresh/evaluations", "teacher"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "teacher" / "embedded_depth.safetensors").write_bytes(b"weights")
    (tmp_path / "teacher" / "embedded_depth.json").write_text("{}")
    code = cli.main(["up", f"run.dir={tmp_path}", "labeler.refresh_step=6", "streamer.sources=[/data/clips]"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (f"reliev3r: cannot move the run before its teacher refresh into {tmp_path / 'before-refresh'}: "
            "evaluations in both the run folder and there; move one of each away") in err, err
    assert (tmp_path / "snapshots" / "step-000000006").is_dir() and not (tmp_path / "processes.json").exists()
    assert sorted(p.name for p in (tmp_path / "before-refresh").iterdir()) == ["evaluations"]


def test_learner_init_is_checked_on_the_run_folder_a_finished_refresh_leaves(tmp_path, capsys, monkeypatch):
    """A refresh whose teacher is whole and whose first part was not moved yet, and
    ``learner.init`` naming a snapshot in the run's own ``snapshots/``: resumed, ``up`` finishes the
    move, after which the learner has no snapshot of its own and would start from ``learner.init``,
    moved away with the first part. ``up`` says so and exits 2, starting nothing. Before, the check
    of ``learner.init`` ran before the move, saw the first learner's snapshot (a resume: init not
    looked at) and passed, and the learner then failed at start, restarted until the run gave up."""
    from reliev3r.supervisor import Supervisor
    from tests.tiny_snapshot import make_tiny_snapshot

    snap = make_tiny_snapshot(tmp_path)
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "embedded_depth.safetensors").write_bytes(b"weights")
    (tmp_path / "teacher" / "embedded_depth.json").write_text("{}")

    def start(_sup, child):
        raise AssertionError(f"{child.name} started")

    monkeypatch.setattr(Supervisor, "_start", start)
    code = cli.main(["up", f"run.dir={tmp_path}", "labeler.refresh_step=2", "streamer.sources=[/data/clips]",
                     f"learner.init={snap}", "monitoring.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"reliev3r: learner.init={snap}: no such file or folder" in err, err
    before = tmp_path / "before-refresh"  # the move finished, its mark written
    assert (before / "snapshots" / snap.name / "meta.json").is_file() and (before / "config.yaml").is_file()
    assert not (tmp_path / "processes.json").exists()


def test_learner_init_is_checked_on_a_resumed_run_whose_teacher_refresh_is_still_to_come(tmp_path, capsys,
                                                                                          monkeypatch):
    """A run resuming its own snapshot with ``labeler.refresh_step`` not reached yet, and
    ``learner.init`` naming weights that are gone (deleted since the warm start): the refresh will
    move the snapshots into ``before-refresh/`` and start the learner afresh from ``learner.init``,
    so ``up`` checks it as a fresh start does, says why and exits 2, starting nothing. Before, the
    check saw the run's snapshot (a resume: init not looked at) and every stage started; the bad
    init surfaced only at the refresh, as a learner failing at start until the run gave up."""
    from learner.warm_start import start_problem
    from reliev3r.supervisor import Supervisor
    from tests.tiny_snapshot import make_tiny_snapshot

    snap = make_tiny_snapshot(tmp_path)  # the run's own, of step 2
    gone = tmp_path.parent / "deleted-run" / "snapshots" / "step-000000009"

    def start(_sup, child):
        raise AssertionError(f"{child.name} started")

    monkeypatch.setattr(Supervisor, "_start", start)
    overrides = [f"run.dir={tmp_path}", "labeler.refresh_step=100", "streamer.sources=[/data/clips]",
                 f"learner.init={gone}", "monitoring.enabled=false"]
    code = cli.main(["up", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert (f"reliev3r: learner.init={gone}: no such file or folder (this run resumes its own snapshot, but its "
            "teacher refresh at step 100 moves it into before-refresh/ and starts the learner from learner.init)"
            ) in err, err
    assert (snap / "meta.json").is_file() and not (tmp_path / "processes.json").exists()
    sup = _refresh_supervisor(tmp_path, *overrides)  # what the refresh leaves the learner: init, unusable
    try:
        sup._move_first_part(tmp_path / "config.yaml")
        assert start_problem(sup.cfg.learner, tmp_path) == f"learner.init={gone}: no such file or folder"
    finally:
        sup.metrics.close()


def _absent_devices() -> tuple[list[str], str]:
    """Devices this host lacks, as a ``device`` value names them (``cuda:<its GPU count>`` on any
    host, ``cuda`` too where there is no CUDA), and the devices it has, as the refusal lists them."""
    import torch

    count = torch.cuda.device_count()
    absent = [f"cuda:{count}"] + ([] if torch.cuda.is_available() else ["cuda"])
    return absent, ", ".join(["cpu", *(f"cuda:{k}" for k in range(count))])


@pytest.mark.parametrize("key", ["labeler.device", "learner.device"])
def test_up_refuses_a_stage_device_this_host_lacks_before_anything_starts(tmp_path, capsys, monkeypatch, key):
    """``labeler.device`` or ``learner.device`` naming a device this host does not have (``cuda``
    on a host without CUDA, ``cuda:N`` past its GPUs; with several labelers too, each on its GPU):
    ``up`` says which key in a line and exits 2, starting nothing. Before, the stage's child
    failed with torch's words ("Torch not compiled with CUDA enabled") and was restarted until the
    run gave up, minutes later."""
    from reliev3r.supervisor import Supervisor

    def start(_sup, child):
        raise AssertionError(f"{child.name} started")

    monkeypatch.setattr(Supervisor, "_start", start)
    absent, present = _absent_devices()
    for device in absent:
        for workers in ([1, 3] if key == "labeler.device" else [1]):
            run = tmp_path / f"{device}-{workers}"
            code = cli.main(["up", f"run.dir={run}", f"{key}={device}", f"labeler.workers={workers}",
                             "monitoring.enabled=false"])
            err = capsys.readouterr().err
            assert code == 2, err
            assert f"reliev3r: {key} '{device}' is not available here (available: {present})\n" in err, err
            assert not run.exists()


def test_up_and_the_evaluator_refuse_evaluation_data_that_is_not_there_before_anything_starts(tmp_path, capsys,
                                                                                               monkeypatch):
    """``evaluator.data=folder:MISSING`` (or ``7scenes:``, ``synthetic:``) started the run, and the
    evaluator then failed at start, "unknown dataset spec", restarted until the run gave up. ``up``
    says it in a line naming the key and exits 2, starting nothing; so does ``reliev3r evaluate``
    started on its own."""
    from reliev3r.supervisor import Supervisor

    def start(_sup, child):
        raise AssertionError(f"{child.name} started")

    monkeypatch.setattr(Supervisor, "_start", start)
    missing = tmp_path / "no such frames"
    for spec in (f"folder:{missing}", f"7scenes:{missing}@0-9", f"synthetic:{missing}", str(missing)):
        run = tmp_path / "run"
        said = (f"evaluator.data {spec}: no such folder" if ":" in spec else
                f"evaluator.data {spec}: unknown dataset spec")
        for command in ("up", "evaluate"):
            code = cli.main([command, f"run.dir={run}", f"evaluator.data={spec}", "monitoring.enabled=false"])
            err = capsys.readouterr().err
            assert code == 2 and err.startswith(f"reliev3r: {said}") and len(err.splitlines()) == 1, err
            assert not run.exists()


def test_up_and_the_streamer_refuse_a_run_that_trains_on_ground_truth_no_source_can_carry(tmp_path, capsys,
                                                                                           monkeypatch):
    """``learner.loss.kind=supervised`` (or the oracle teacher) on sources that can carry no ground
    truth (a live feed, an image folder without depth maps or poses) started the run: the streamer
    skipped every window (``no_ground_truth``) and the learner waited for ever. ``up`` says it in a
    line naming ``streamer.sources`` and each source and exits 2, starting nothing; so does
    ``reliev3r stream`` started on its own. With a source that may carry it, a folder not there yet,
    the run starts."""
    import numpy as np

    from reliev3r.imaging import write_image
    from reliev3r.supervisor import Supervisor

    def start(_sup, child):
        raise AssertionError(f"{child.name} started")

    monkeypatch.setattr(Supervisor, "_start", start)
    frames = tmp_path / "frames"
    frames.mkdir()
    for k in range(3):
        assert write_image(frames / f"frame-{k:06d}.color.png", np.full((24, 32, 3), 40 * k, np.uint8))
    run = tmp_path / "run"
    for teacher in ("learner.loss.kind=supervised", "labeler.teacher=oracle"):
        sources = f"streamer.sources=[rtsp://cam1/stream, {frames}]"
        for command in ("up", "stream"):
            port = f"network.work_port={free_port()}"  # a stage on its own: the port its peers use
            code = cli.main([command, f"run.dir={run}", sources, teacher, port, "monitoring.enabled=false"])
            err = capsys.readouterr().err
            assert code == 2 and len(err.splitlines()) == 1, err
            assert err.startswith(f"reliev3r: streamer.sources carry none of the ground truth {teacher}"), err
            assert "rtsp://cam1/stream: a live feed, whose frames carry none; " in err, err
            assert f"{frames}: an image folder with no depth map ({frames}/<frame>.depth.png)" in err, err
            assert not run.exists()
    with pytest.raises(AssertionError, match="started"):  # a folder that may yet fill: the run starts
        cli.main(["up", f"run.dir={run}", f"streamer.sources=[{frames}, {tmp_path / 'not yet'}]",
                  "learner.loss.kind=supervised", "monitoring.enabled=false"])


def test_up_refuses_a_labeler_whose_gpu_this_host_lacks_naming_it():
    """With ``labeler.device=cuda`` labeler K runs on ``cuda:(K mod GPUs)``: each labeler's own
    device is checked, and one missing (here: planned for one GPU more than this host has) is
    named with the config's value."""
    import torch

    from reliev3r.config import load
    from reliev3r.supervisor import Supervisor

    count = torch.cuda.device_count()
    cfg = load([ROOT / "configs" / "default.yaml"], ["labeler.device=cuda", f"labeler.workers={count + 1}"])
    sup = Supervisor(cfg, out=io.StringIO())
    try:
        sup.children = {c.name: c for c in Supervisor._plan(cfg, gpus=count + 1)}
        _, present = _absent_devices()
        said = f" (labeler-{count} on cuda:{count})" if count else ""  # without GPUs: 'cuda' itself is missing
        assert sup.device_problem() == f"labeler.device 'cuda'{said} is not available here (available: {present})"
        assert cfg.device_problem("labeler", device=f"cuda:{count}", instance="labeler-7") == (
            f"labeler.device 'cuda' (labeler-7 on cuda:{count}) is not available here (available: {present})")
        sup.children = {c.name: c for c in Supervisor._plan(cfg, gpus=max(1, count))}
        assert sup.device_problem() == (None if count else
                                        f"labeler.device 'cuda' is not available here (available: {present})")
    finally:
        sup.metrics.close()


@pytest.mark.parametrize("command, key", [("label", "labeler.device"), ("learn", "learner.device")])
def test_a_stage_started_on_its_own_refuses_a_device_this_host_lacks(monkeypatch, capsys, command, key):
    """``reliev3r label`` / ``learn`` on a device this host does not have: the line ``up`` says,
    exit 2, before the stage starts. Before, the stage started and failed with torch's words
    (the labeler) or the device check's, as a traceback in its log, exit 1."""
    base = _free_block(2)
    for name in ("RELIEV3R_SUPERVISED", "RELIEV3R_INSTANCE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    absent, present = _absent_devices()
    for device in absent:
        code = cli.main([command, f"{key}={device}", f"network.work_port={base}", f"network.replay_port={base + 1}",
                         "monitoring.enabled=false"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"reliev3r: {key} '{device}' is not available here (available: {present})\n" in err, err


def test_a_run_refreshed_before_the_move_had_its_mark_resumes_as_it_is(tmp_path):
    """A run refreshed by a version that copied no config.yaml into ``before-refresh/`` (the
    mark of a whole move): its first part is there and the new learner has snapshots of its own.
    Resumed, the move is not taken for one cut short (which would refuse both snapshots folders):
    only the mark is written, and nothing moves."""
    for folder in ("snapshots/step-000000040", "before-refresh/snapshots/step-000000006",
                   "before-refresh/evaluations", "evaluations", "teacher"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "teacher" / "embedded_depth.safetensors").write_bytes(b"weights")
    (tmp_path / "teacher" / "embedded_depth.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("run: {}\n")
    sup = _refresh_supervisor(tmp_path)
    try:
        assert not sup._finish_refresh(tmp_path / "config.yaml")
    finally:
        sup.metrics.close()
    assert (tmp_path / "before-refresh" / "config.yaml").read_text() == "run: {}\n"
    assert (tmp_path / "snapshots" / "step-000000040").is_dir() and (tmp_path / "evaluations").is_dir()
    assert sorted(p.name for p in (tmp_path / "before-refresh").iterdir()) == ["config.yaml", "evaluations",
                                                                               "snapshots"]


@pytest.mark.parametrize("distilled", ["moved", "here"])
def test_a_refreshed_run_whose_before_refresh_folder_is_gone_resumes_as_it_is(tmp_path, distilled):
    """A whole refresh (its teacher's meta names the snapshot it distilled, by step and digest),
    then ``before-refresh/`` deleted by hand and the run resumed (``moved``): the run's snapshots
    are the second learner's, not the one distilled, so nothing is moved and the resume says what
    is gone. Before, the second learner's snapshots, evaluations and replay were moved into a new
    ``before-refresh/`` as if the refresh had been cut short, and its learner started from
    scratch. The snapshot distilled still in the run folder (``here``: a move cut short before it
    began) is moved, as before."""
    step = {"moved": 40, "here": 6}[distilled]
    digest = {"moved": "b" * 64, "here": "a" * 64}[distilled]
    for folder in (f"snapshots/step-{step:09d}", "evaluations", "replay", "teacher"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "snapshots" / f"step-{step:09d}" / "meta.json").write_text(
        json.dumps({"step": step, "files": {"ema.safetensors": {"bytes": 1, "sha256": digest}}}))
    (tmp_path / "evaluations" / f"step-{step:09d}.json").write_text("{}")
    (tmp_path / "replay" / "replay.sqlite").write_text("")
    (tmp_path / "teacher" / "embedded_depth.safetensors").write_bytes(b"weights")
    extra = {"snapshot": str(tmp_path / "snapshots" / "step-000000006"), "step": 6, "weights": "ema",
             "weights_sha256": "a" * 64}
    (tmp_path / "teacher" / "embedded_depth.json").write_text(json.dumps({"data": {"extra": extra}}))
    (tmp_path / "config.yaml").write_text("run: {}\n")
    sup = _refresh_supervisor(tmp_path)
    try:
        said = sup._finish_refresh(tmp_path / "config.yaml")
    finally:
        sup.metrics.close()
    before = tmp_path / "before-refresh"
    names = (f"snapshots/step-{step:09d}/meta.json", f"evaluations/step-{step:09d}.json", "replay/replay.sqlite")
    if distilled == "here":
        assert said.startswith("the teacher refresh the run stopped in is finished"), said
        assert all((before / name).is_file() and not (tmp_path / name).exists() for name in names)
        return
    assert all((tmp_path / name).is_file() for name in names) and not before.exists()
    assert said == (f"warning: the run before the teacher refresh is gone ({before} is missing: the first "
                    f"learner's snapshots, evaluations and replay store); the run goes on as it is on "
                    f"{sup.teacher_file}, nothing moved"), said


def test_the_refresh_fine_tunes_the_embedded_teacher_in_use_else_the_shipped_one(tmp_path):
    from labelers.embedded import WEIGHTS
    from reliev3r.config import ConfigError, load
    from reliev3r.supervisor import refresh_init

    (tmp_path / "mine").mkdir()
    assert refresh_init("embedded") == WEIGHTS
    assert refresh_init(f"embedded:{tmp_path / 'mine'}") == tmp_path / "mine" / WEIGHTS.name
    assert refresh_init(f"embedded:{tmp_path / 'w.safetensors'}") == tmp_path / "w.safetensors"
    assert refresh_init("pydnet:/models/pydnet++.tflite") == refresh_init("oracle") == WEIGHTS
    for bad in ("labeler.refresh_step=-1", "labeler.refresh_seconds=0"):
        with pytest.raises(ConfigError, match="refresh"):
            load([ROOT / "configs" / "default.yaml"], [bad])


def test_only_a_run_that_learns_from_its_depth_teacher_refreshes_it(tmp_path):
    """configs/gpu.yaml refreshes; its supervised sibling, an oracle run (ground truth is not
    improved by distilling) and a run without a depth teacher keep their teacher and learner."""
    from reliev3r.config import load

    clips = "streamer.sources=[/data/clips]"
    assert load([ROOT / "configs" / "gpu.yaml"], [clips]).refreshes_teacher
    assert not load([ROOT / "configs" / "default.yaml"], [clips]).refreshes_teacher  # off by default
    # the built-in synthetic world (no sources) is what the shipped teacher was trained on
    synthetic = load([ROOT / "configs" / "gpu.yaml"])
    assert not synthetic.refreshes_teacher and "synthetic world" in synthetic.refresh_skipped
    for extra in ("learner.loss.kind=supervised", "labeler.teacher=oracle?strength=1", "labeler.teacher=oracle-gt",
                  "labeler.teacher=none"):
        sup = _refresh_supervisor(tmp_path, extra)
        try:
            assert sup._refresh == "off", extra
            sup.run_dir.mkdir(exist_ok=True)
            sup._refresh_teacher()  # a snapshot past the step would change nothing either
            assert sup._refresh == "off" and sup._distill is None
        finally:
            sup.metrics.close()


@pytest.mark.timeout(300)  # bounds a hang only
def test_a_stage_that_keeps_failing_at_start_stops_the_run_with_its_error(tmp_path, monkeypatch):
    """A config the stage cannot run with (a teacher file that is not there; a dataset that is not
    there; windows longer than every source) made ``up`` restart that stage for ever: after
    ``GIVE_UP_AFTER`` early failures in a row with the same error the run stops, says why, exit 1.
    The real labeler process, started and reaped by the supervisor as ``up`` does."""
    import yaml

    from reliev3r import config as rconfig
    from reliev3r import supervisor

    monkeypatch.setattr(supervisor, "GIVE_UP_AFTER", 3)
    sup = supervisor.Supervisor(rconfig.load([ROOT / "configs" / "default.yaml"],
                                             [f"run.dir={tmp_path}",
                                              f"labeler.teacher=onnx:{tmp_path / 'bogus.onnx'}?space=depth"]),
                                 out=io.StringIO())
    try:
        (tmp_path / "logs").mkdir()
        sup.config_file = tmp_path / "config.yaml"
        sup.config_file.write_text(yaml.safe_dump(rconfig.to_dict(sup.cfg), sort_keys=False))
        for child in sup.children.values():  # the labeler alone: the others would wait on it
            child.finished = child.stage != "labeler"
        deadline = time.time() + 240
        while not sup.gave_up and time.time() < deadline:
            sup._reap_and_restart()
            time.sleep(0.2)
        assert sup.gave_up and sup._final_code() == 1, sup.out.getvalue()
        assert "labeler failed 3 times in a row at start" in sup.gave_up and "bogus.onnx' does not exist" in sup.gave_up
        assert sup.out.getvalue().count("labeler died") == 2 and sup.children["labeler"].proc is None
    finally:
        sup.metrics.close()


def test_last_error_of_a_crashed_child_from_its_log(tmp_path):
    """What the status line says about a crashed child: the last error of its own
    incarnation's log, whether logged (JSON, with the exception's last line or the problem
    logged before it) or a traceback outside the structured log."""
    from reliev3r.supervisor import last_error

    log = tmp_path / "stage.log"
    old = '{"level": "ERROR", "msg": "stage failed", "exc": "Traceback\\nKeyError: an older run"}\n'
    log.write_text(old + '{"level": "INFO", "msg": "up"}\n')
    assert last_error(log, len(old)) == ""
    log.write_text(old + "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                   "    raise OSError(98)\nOSError: [Errno 98] Address already in use\n")
    assert last_error(log, len(old)) == "OSError: [Errno 98] Address already in use"
    log.write_text('{"level": "ERROR", "msg": "stage failed", "exc": "Traceback\\n  File x\\n'
                   'ValueError: unknown dataset spec"}\n')
    assert last_error(log) == "stage failed: ValueError: unknown dataset spec"
    log.write_text('{"level": "ERROR", "msg": "stage failed", "exc": "Traceback\\ntorch.AcceleratorError: CUDA error: '
                   'x\\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1\\nCompile with `TORCH_USE_CUDA_DSA` to '
                   'enable device-side assertions.\\n"}\n')
    assert last_error(log) == "stage failed: torch.AcceleratorError: CUDA error: x"
    log.write_text('{"level": "WARNING", "msg": "source problem", "reason": "source_failed", '
                   '"detail": "TypeError: x"}\n'
                   '{"level": "ERROR", "msg": "no source produced a window"}\n{"level": "INFO", "msg": "done"}\n')
    assert last_error(log) == "no source produced a window (last problem: source_failed: TypeError: x)"
    # a SourceError's detail starts with its reason (the streamer's own log line says it once)
    from streamer.sources import discover
    problems = []
    discover([str(tmp_path / "nonexist")], on_error=lambda source, reason, detail: problems.append((reason, detail)))
    [(reason, detail)] = problems
    log.write_text(json.dumps({"level": "WARNING", "msg": "source problem", "reason": reason, "detail": detail})
                   + '\n{"level": "ERROR", "msg": "no source produced a window"}\n')
    assert last_error(log) == (f"no source produced a window (last problem: missing: {tmp_path / 'nonexist'}: "
                               f"[Errno 2] No such file or directory: '{tmp_path / 'nonexist'}')")


# --------------------------------------------------------------------------- metric names


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package prometheus; .ci/run installs it)")
# Exported only by processes with network.curve enabled (not the demo pipeline).
OPTIONAL_METRICS = {"reliev3r_auth_failures"}


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=HANG_S)


@needs_promtool
def test_promtool_accepts_registered_metrics():
    """The metrics that can be built without running a stage: the base set every process
    exports, each stage's metrics class, CURVE refusals."""
    from evaluation.service import EvaluatorMetrics
    from labelers.service import LabelerMetrics
    from learner.service import LearnerMetrics
    from reliev3r import security
    from replay.service import ReplayMetrics
    from streamer.service import StreamerMetrics

    for stage, registers in (("streamer", (StreamerMetrics,)), ("labeler", (LabelerMetrics,)),
                             ("replay", (ReplayMetrics, security.auth_failures)), ("learner", (LearnerMetrics,)),
                             ("evaluator", (EvaluatorMetrics,))):
        m = Metrics(stage)
        for register in registers:
            register(m)
        text = generate_latest(m.registry).decode()
        result = promtool_check_metrics(text)
        assert result.returncode == 0 and not result.stdout.strip(), (stage, result.stdout + result.stderr)
    bad = "# HELP reliev3r_x_seconds_total x\n# TYPE reliev3r_x_seconds_total gauge\nreliev3r_x_seconds_total 1\n"
    assert promtool_check_metrics(bad).returncode != 0  # promtool does lint names


# --------------------------------------------------------------------------- acceptance

def _families(text: str) -> set[str]:
    """Metric family names declared in an exposition (``# TYPE``), even those without samples yet."""
    return {re.sub(r"_total$", "", n) for n in re.findall(r"^# TYPE (\S+) ", text, re.M)}


def _referenced_families(queries: list[str]) -> set[str]:
    names = set(re.findall(r"\breliev3r_[a-z0-9_]+", " ".join(queries)))
    return {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in names}


def _prom_query(port: int, expr: str) -> list:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=HANG_S) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


HANG_S = 120.0
"""Bounds a hang only: every wait ends as soon as what it waits for happened."""


def _wait(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.slow
@pytest.mark.timeout(1800)  # bounds a hang only: the waits below end once what they wait for happened
@pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                    reason="prometheus/promtool not installed (Debian package prometheus; .ci/run installs it)")
def test_prometheus_sees_every_dashboard_and_alert_query(tmp_path):
    """A real Prometheus with the project's scrape config and rules, scraping a running
    `reliev3r up`: every dashboard query and every alert query returns data, every metric they
    name is exported, and every endpoint passes `promtool check metrics`."""
    from tests.helpers_deploy import alert_queries, dashboard_queries

    stages = ("supervisor", "streamer", "labeler", "replay", "learner", "evaluator")
    ports = {s: free_port() for s in stages}
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "reliev3r.cli", "up", "--config", "configs/default.yaml",
           "--config", "configs/demo.yaml", "--max-steps", "0", f"run.dir={run_dir}", "network.work_port=0",
           "network.replay_port=0", "network.supervisor_port=0", "learner.snapshot_every=5",
           *(f"monitoring.ports.{s}={p}" for s, p in ports.items())]
    up_log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(cmd, cwd=ROOT, stdout=up_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    # The project's local scrape config, pointed at this run's ports and scraping every second.
    prom_cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    prom_cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    shutil.copy(DEPLOY / "prometheus" / "alerts.yml", tmp_path / "alerts.yml")
    prom_cfg["rule_files"] = [str(tmp_path / "alerts.yml")]
    for sc in prom_cfg["scrape_configs"][0]["static_configs"]:
        sc["targets"] = [f"127.0.0.1:{ports[sc['labels']['component']]}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
    prom_port = free_port()
    prom_log = open(tmp_path / "prometheus.log", "wb")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=prom_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait(lambda: urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/-/ready", timeout=HANG_S).status == 200,
              HANG_S, "prometheus ready")
        _wait(lambda: [r for r in _prom_query(prom_port, "max(reliev3r_learner_step) >= 6")], 600,
              "the learner to make 6 steps (and snapshot)")
        queries = sorted(set(dashboard_queries() + alert_queries()))

        def empty() -> list[str]:
            return [q for q in queries if not _prom_query(prom_port, q)]

        # The slowest series (first evaluation of a snapshot) may need more time: wait for it,
        # the deadline bounds a hang only.
        deadline = time.monotonic() + 600
        missing = empty()
        while missing and time.monotonic() < deadline:
            time.sleep(2)
            missing = empty()
        assert not missing, f"queries without data: {missing}"

        texts = {s: urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=HANG_S).read().decode()
                 for s, p in ports.items()}
        exported = set().union(*(_families(t) for t in texts.values()))
        unknown = _referenced_families(queries) - exported - OPTIONAL_METRICS
        assert not unknown, f"dashboards/alerts name metrics no process exports: {sorted(unknown)}"
        for stage, text in texts.items():
            result = promtool_check_metrics(text)
            assert result.returncode == 0 and not result.stdout.strip(), (stage, result.stdout + result.stderr)
        alerts = _prom_query(prom_port, "ALERTS")
        assert all(a["metric"]["alertname"].startswith("Reliev3r") for a in alerts)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        prom.terminate()
        try:
            prom.wait(timeout=HANG_S)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait()
        up_log.close()
        prom_log.close()
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]


def test_free_ports_are_distinct_and_below_the_kernels_ephemeral_range(tmp_path, monkeypatch):
    """Ports left at 0 get distinct free ports outside the range the kernel gives outgoing
    connections (which could take a chosen port before the stage binds it); with no known
    range the kernel's own choice is the fallback."""
    from reliev3r import ports
    from reliev3r.config import load

    names = ["supervisor", "streamer", "labeler", "replay", "learner", "evaluator"]
    range_file = tmp_path / "ip_local_port_range"
    range_file.write_text("32768\t60999\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", range_file)
    got = ports.resolve(load([ROOT / "configs" / "default.yaml"]), names)
    assert len(got) == len(ports.NETWORK_PORTS) + len(names) and len(set(got.values())) == len(got)
    assert all(ports.FREE_PORT_FLOOR <= p < 32768 for p in got.values())
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", tmp_path / "absent")
    got = ports.resolve(load([ROOT / "configs" / "default.yaml"]), names)
    assert len(set(got.values())) == len(got) and all(p > 0 for p in got.values())


def test_the_refresh_s_move_is_on_disk_before_its_mark_and_the_mark_after(tmp_path, folder_fsyncs):
    """The move of the first part (renames out of the run folder into ``before-refresh/``) is
    flushed, both folders, before its mark (``before-refresh/config.yaml``) is written, and the
    mark's folder after it: a power loss cannot leave a mark whose move is lost, nor lose the mark
    of a move once made. Before, nothing was fsynced."""
    for folder in ("snapshots/step-000000006", "evaluations", "teacher"):
        (tmp_path / folder).mkdir(parents=True)
    (tmp_path / "teacher" / "embedded_depth.safetensors").write_bytes(b"weights")
    (tmp_path / "teacher" / "embedded_depth.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("run: {}\n")
    before = tmp_path / "before-refresh"
    before.mkdir()
    marked = lambda: (before / "config.yaml").is_file()  # noqa: E731
    run_flushed = folder_fsyncs(tmp_path, lambda: ((before / "snapshots").is_dir(), marked()))
    sup = _refresh_supervisor(tmp_path)
    try:
        sup._move_first_part(tmp_path / "config.yaml")
    finally:
        sup.metrics.close()
    assert marked() and (before / "snapshots" / "step-000000006").is_dir()
    assert (True, False) in run_flushed  # the run folder: moved out, before the mark
    before_flushed = folder_fsyncs(before, marked)
    (before / "config.yaml").unlink()
    sup = _refresh_supervisor(tmp_path)
    try:
        sup._mark_moved(tmp_path / "config.yaml")
    finally:
        sup.metrics.close()
    assert before_flushed and before_flushed[-1] is True  # the mark's folder flushed once it is there
    assert (before / "config.yaml").read_text() == "run: {}\n"


def test_the_run_s_config_and_processes_are_written_durably(tmp_path, folder_fsyncs):
    """``config.yaml`` and ``processes.json`` are renamed into the run folder and the folder
    flushed after (``reliev3r.durable.write``): after a power loss a resumed run reads the config
    it ran with. Before, the folder was not fsynced."""
    sup = _refresh_supervisor(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    flushed = folder_fsyncs(tmp_path, lambda: ((tmp_path / "config.yaml").is_file(),
                                                (tmp_path / "processes.json").is_file()))
    try:
        sup._write_config(tmp_path / "config.yaml")
        sup._write_pids()
    finally:
        sup.metrics.close()
    assert (True, False) in flushed and (True, True) in flushed


def test_the_start_line_says_what_snapshots_are_scored_on_and_how_to_score_your_own_footage(tmp_path):
    """A run on one's own footage is scored on the held-out synthetic world unless
    ``evaluator.data`` names ground truth: ``up`` says it as it starts, with the keys to set,
    where the sources are not the synthetic world; and names the dataset otherwise."""
    from reliev3r.supervisor import Supervisor

    said = {}
    for name, extra in {"synthetic": [], "footage": ["streamer.sources=[/data/clips]"],
                        "kitchen": ["streamer.sources=[/data/clips]", "evaluator.data=7scenes:/data/kitchen"]}.items():
        cfg = cli.load_config(cli.parse_args(["up", f"run.dir={tmp_path / name}", *extra]))
        sup = Supervisor(cfg, out=io.StringIO())
        try:
            said[name] = sup.start_line()
        finally:
            sup.metrics.close()
    assert "scored on synthetic" in said["synthetic"] and "evaluator.data=" not in said["synthetic"]
    assert ("scored on synthetic (the synthetic world, not your sources: evaluator.data=7scenes:DIR, "
            "scannet:DIR or folder:DIR scores on their ground truth)") in said["footage"]
    assert "scored on 7scenes:/data/kitchen" in said["kitchen"] and "not your sources" not in said["kitchen"]


def test_the_start_line_says_whether_the_learner_resumes_its_snapshot_or_starts_from_init(tmp_path):
    """``up`` with ``learner.init`` said "learner starting from INIT unless the run folder has a
    snapshot", leaving the user to find out which; a run stopped once and started again with a new
    init resumed its own snapshot, said only in the learner's log. It now says which, and the step."""
    from reliev3r.supervisor import Supervisor

    def line(name: str, *extra: str) -> str:
        run = tmp_path / name
        cfg = cli.load_config(cli.parse_args(["up", f"run.dir={run}", "learner.init=/w/init", *extra]))
        sup = Supervisor(cfg, out=io.StringIO())
        try:
            return sup.start_line()
        finally:
            sup.metrics.close()

    assert "learner starting from /w/init," in line("fresh")
    snap = tmp_path / "own" / "snapshots" / "step-000000040"
    snap.mkdir(parents=True)
    (snap / "meta.json").write_text("{}")
    said = line("own")
    assert "learner resuming its snapshot of step 40 (learner.init ignored: a run resumes its own)" in said, said
    (tmp_path / "ahead" / "snapshots").mkdir(parents=True)
    snap.rename(tmp_path / "ahead" / "snapshots" / snap.name)
    said = line("ahead", "streamer.sources=[/data/clips]", "labeler.refresh_step=100")
    assert "learner resuming its snapshot of step 40, from /w/init after the teacher refresh" in said, said


_WRITER = """
import json, sys, time
from pathlib import Path

gates, n = Path(sys.argv[1]), 0
for phase in range(int(sys.argv[2])):
    while not (gates / f"go-{phase}").exists():  # the test rotates between phases
        time.sleep(0.01)
    for _ in range(30):
        print(json.dumps({"level": "INFO", "msg": "frame", "n": n}))
        n += 1
    if phase == int(sys.argv[2]) - 1:  # the last phase: a traceback that a rotation cuts in two
        print("Traceback (most recent call last):")
        print('  File "feed.py", line 7, in <module>')
    (gates / f"done-{phase}").touch()
while not (gates / "end").exists():
    time.sleep(0.01)
print("ValueError: broken feed")
sys.exit(1)
"""


def _write_rotating(sup, proc: subprocess.Popen, gates: Path, phases: int, log: Path) -> None:
    """Let ``proc`` (running ``_WRITER``) write its phases, the supervisor rotating the logs after
    each, then let it end."""
    for phase in range(phases):
        (gates / f"go-{phase}").touch()
        while not (gates / f"done-{phase}").exists():
            assert proc.poll() is None, log.read_text()
            time.sleep(0.01)
        sup._rotate_logs()
    (gates / "end").touch()


def _assert_rotated(logs: Path, name: str, phases: int) -> None:
    """``logs/name`` rotated as ``_WRITER``'s phases passed ``LOG_BYTES``: ``LOG_KEEP`` older files
    beside it, none much past the limit, the newest phases' lines kept once and in order (the test
    rotates only between the writer's phases: nothing lost but the older phases dropped), and the
    fresh log holding the last line."""
    from reliev3r import supervisor as rsup

    assert sorted(p.name for p in logs.iterdir()) == [name] + [f"{name}.{k}" for k in range(1, rsup.LOG_KEEP + 1)]
    assert all(p.stat().st_size < 2 * rsup.LOG_BYTES for p in logs.iterdir())
    assert (logs / name).read_text() == "ValueError: broken feed\n"
    kept = [json.loads(line)["n"] for k in range(rsup.LOG_KEEP, 0, -1)
            for line in (logs / f"{name}.{k}").read_text().splitlines() if line.startswith("{")]
    assert kept == list(range(30 * phases - 30 * rsup.LOG_KEEP, 30 * phases))


@pytest.mark.timeout(120)  # bounds a hang only
def test_a_child_s_log_is_rotated_past_its_size_and_its_last_error_is_still_read(tmp_path, monkeypatch):
    """A run that never stops: the log a child writes (the file it inherits, opened for appending)
    is rotated when it passes ``LOG_BYTES`` (lowered here): ``<child>.log.1`` .. ``.LOG_KEEP``, the
    child writing on into a fresh ``<child>.log``. Before, nothing rotated the logs: they grew without
    bound. Every line is in one file, once, in order, and the reason a crashed child is reported with
    is read across a rotation (its traceback begun in ``.log.1``, ended in the fresh log)."""
    from reliev3r import supervisor as rsup
    from reliev3r.config import load

    class Feed(rsup.Supervisor):
        def command(self, child):  # a real process that writes what the test tells it to
            return [sys.executable, "-c", _WRITER, str(gates), str(phases)]

    monkeypatch.setattr(rsup, "LOG_BYTES", 1000)  # 30 lines are some 1500 bytes: each phase passes it
    gates, phases = tmp_path / "gates", 6
    gates.mkdir()
    sup = Feed(load([ROOT / "configs" / "default.yaml"], [f"run.dir={tmp_path / 'run'}"]),
               out=io.StringIO())
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    sup.config_file = tmp_path / "run" / "config.yaml"
    child = sup.children["streamer"]
    for other in sup.children.values():
        other.finished = other is not child  # the streamer alone
    (logs / "streamer.log").write_text('{"level": "ERROR", "msg": "an older incarnation", "exc": "KeyError: x"}\n')
    try:
        sup._start(child)
        _write_rotating(sup, child.proc, gates, phases, logs / "streamer.log")
        assert child.proc.wait(60) == 1
        sup._reap_and_restart()
        assert child.last_error == "ValueError: broken feed", sup.out.getvalue()
        assert "streamer died (exit code 1): ValueError: broken feed" in sup.out.getvalue()
        assert "restarts 1 (streamer: ValueError: broken feed)" in sup.status_line()
        _assert_rotated(logs, "streamer.log", phases)
        assert (logs / "streamer.log.1").read_text().endswith('  File "feed.py", line 7, in <module>\n')
    finally:
        if child.proc is not None and child.proc.poll() is None:
            child.proc.kill()
            child.proc.wait()
        sup.metrics.close()


@pytest.mark.timeout(120)  # bounds a hang only
def test_the_teacher_refresh_s_log_is_rotated_as_a_child_s_and_its_failure_still_read(tmp_path, monkeypatch):
    """``logs/distill.log``, the log of the teacher refresh's one-off child, is rotated past
    ``LOG_BYTES`` (lowered here) as every child's log is: ``distill.log.1`` .. ``.LOG_KEEP``, the child
    writing on into a fresh ``distill.log``; a failed refresh still says why, from the lines its
    distillation wrote (its traceback begun in ``.log.1``), not from an earlier one's. Before, the
    supervisor rotated the children's logs only: ``distill.log`` grew without bound."""
    from reliev3r import supervisor as rsup
    from reliev3r.config import load

    class Refresh(rsup.Supervisor):
        def distill_command(self):  # a real process that writes what the test tells it to
            return [sys.executable, "-u", "-c", _WRITER, str(gates), str(phases)]

    monkeypatch.setattr(rsup, "LOG_BYTES", 1000)  # 30 lines are some 1500 bytes: each phase passes it
    gates, phases = tmp_path / "gates", 6
    gates.mkdir()
    run = tmp_path / "run"
    sup = Refresh(load([ROOT / "configs" / "default.yaml"],
                       [f"run.dir={run}", "labeler.refresh_step=6", "streamer.sources=[/data/clips]"]),
                  out=io.StringIO())
    (run / "snapshots" / "step-000000006").mkdir(parents=True)
    (run / "snapshots" / "step-000000006" / "meta.json").write_text("{}")
    logs = run / "logs"
    logs.mkdir()
    (logs / "distill.log").write_text('{"level": "ERROR", "msg": "an earlier refresh", "exc": "KeyError: x"}\n')
    try:
        sup._refresh_teacher()
        assert sup._refresh == "distilling", sup.out.getvalue()
        _write_rotating(sup, sup._distill, gates, phases, logs / "distill.log")
        assert sup._distill.wait(60) == 1
        sup._refresh_teacher()
        assert sup._refresh == "failed"
        assert "teacher refresh failed (ValueError: broken feed)" in sup.out.getvalue(), sup.out.getvalue()
        _assert_rotated(logs, "distill.log", phases)
    finally:
        if sup._distill is not None and sup._distill.poll() is None:
            sup._distill.kill()
            sup._distill.wait()
        sup.metrics.close()
