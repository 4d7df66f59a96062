"""The whole pipeline as real processes: ``reliev3r up`` on the embedded synthetic world.

One small world is rendered once per session and linked into each run folder. Each test
starts the real supervisor in a subprocess (every stage its own process, real ZeroMQ on
127.0.0.1, the default ports: free ones) and checks what an operator would: exit code, status
lines, snapshots, evaluation results, restarts after SIGKILL, rejection of malformed messages,
and no processes left behind. A test that reads a running pipeline (a metrics scrape, a probe)
runs it without a step limit and stops it itself afterwards: a short run could end first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from reliev3r import config as rconfig
from reliev3r.report import write_report
from reliev3r.synthetic import ensure_world
from streamer.config import SyntheticConfig
from tests.helpers_report import assert_curves, chromium, screenshot

ROOT = Path(__file__).resolve().parents[1]
# Every wait below ends once what it waits for happened; the timeouts bound hangs only.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SMALL = ["streamer.synthetic.scenes=1", "streamer.synthetic.frames=40", "streamer.synthetic.height=96",
         "streamer.synthetic.width=128", "streamer.height=48", "streamer.width=64", "streamer.views=3",
         "streamer.frame_stride=3", "streamer.window_step=3", "evaluator.windows=2", "evaluator.stride=3",
         "learner.snapshot_every=5", "learner.batch_size=2", "learner.threads=1", "replay.min_size=2"]


@pytest.fixture(scope="session")
def worlds(tmp_path_factory):
    """The training world and the held-out evaluation world, rendered once."""
    base = tmp_path_factory.mktemp("worlds")
    cfg = rconfig.load([ROOT / "configs" / "default.yaml", ROOT / "configs" / "demo.yaml"], SMALL).streamer.synthetic
    ensure_world(base / "world", cfg, progress=False)
    held_out = SyntheticConfig(**{**{f: getattr(cfg, f) for f in cfg.__slots__}, "seed": cfg.seed + 1000})
    ensure_world(base / "eval_world", held_out, progress=False)
    return base


def _start(run_dir: Path, worlds: Path, *extra: str, max_steps: int, command: str = "up") -> subprocess.Popen:
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("world", "eval_world"):
        (run_dir / name).symlink_to(worlds / name)
    # No port overrides: the defaults are free ports, so the tests (and other runs) share the host.
    cmd = [sys.executable, "-m", "reliev3r.cli", command, "--config", str(ROOT / "configs" / "default.yaml"),
           "--config", str(ROOT / "configs" / "demo.yaml"), "--max-steps", str(max_steps),
           f"run.dir={run_dir}", *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"reliev3r up did not finish in {timeout}s:\n{out[-4000:]}")
    return out


def _processes(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "processes.json").read_text())
    except (OSError, ValueError):
        return {}


def _learner_step(run_dir: Path) -> int:
    snaps = sorted((run_dir / "snapshots").glob("step-*"))
    return int(snaps[-1].name.split("-")[1]) if snaps else 0


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.read().decode()


def _counted(url: str, name: str) -> float:
    """Sum of the samples of metric ``name`` at ``url`` (0 when it has none yet, or when the
    endpoint does not answer yet: a process just (re)started)."""
    try:
        text = _scrape(url)
    except OSError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _stop(proc: subprocess.Popen, timeout: float = 120) -> str:
    """SIGTERM a run started without a step limit; its output."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return _finish(proc, timeout=timeout)


def _status_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("[") and " | step " in line]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_up_reaches_max_steps_with_snapshot_and_evaluation(tmp_path, worlds):
    run_dir = tmp_path / "run"
    out = _finish(_start(run_dir, worlds, max_steps=8))
    assert "stopping after 8 steps" in out
    assert "learner finished" in out and "evaluator finished" in out, out[-3000:]
    assert " | step " in out and "stored" in out  # the status line
    evaluations = sorted((run_dir / "evaluations").glob("step-*.json"))
    assert evaluations, out[-3000:]
    final = json.loads(evaluations[-1].read_text())
    assert final["step"] == 8
    for key in ("absrel_med", "ate", "auc30"):
        assert key in final["model"] and key in final["baseline_constant_identity"]
    assert "AbsRel" in out and "ATE" in out  # the final result is printed
    # The last status line is the final state (not a heartbeat from a step before the end).
    last = _status_lines(out)[-1]
    assert "| step 8 |" in last and "eval@8 " in last, last
    assert (run_dir / "snapshots" / "step-000000008" / "meta.json").is_file()
    assert not list((run_dir / "snapshots").glob("*.tmp*")), "half-written snapshot left behind"
    # The evaluator's pictures beside its JSON, and the run's report page (rendered where
    # chromium is installed; tests/test_report.py and tests/helpers_report.py have the details).
    stem = evaluations[-1].stem
    assert final["pictures"] == [f"{stem}.depth.png", f"{stem}.trajectory.png"]
    assert all((run_dir / "evaluations" / name).stat().st_size > 0 for name in final["pictures"])
    page = write_report(run_dir)
    assert page.read_text().count("<svg") >= 10
    if chromium():
        assert_curves(screenshot(page, tmp_path / "report.png"), min_pixels=100)  # one point per chart


def test_labeler_sigkill_is_restarted_and_malformed_messages_are_counted(tmp_path, worlds, wait_for):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, worlds, max_steps=0)  # runs until the test stops it: every scrape finds it up
    try:
        procs = wait_for(lambda: ((p := _processes(run_dir)).get("labeler", {}).get("pid")
                                  and _learner_step(run_dir) >= 5 and p),
                          300, "the learner's first snapshot", procs=[proc])
        cfg = rconfig.load([run_dir / "config.yaml"])
        # Garbage to every bound socket: streamer ROUTER, replay ROUTER, supervisor PULL.
        ctx = zmq.Context()
        for port, kind in ((cfg.network.work_port, zmq.DEALER), (cfg.network.replay_port, zmq.DEALER),
                           (cfg.network.supervisor_port, zmq.PUSH)):
            sock = ctx.socket(kind)
            sock.connect(f"tcp://127.0.0.1:{port}")
            sock.send_multipart([b"R3W\x01", b"\xc1 not msgpack"])
            sock.send_multipart([b"hello"])
            sock.close(linger=60_000)  # term() returns once they are sent (the linger bounds a hang)
        ctx.term()
        for stage in ("streamer", "replay", "supervisor"):  # counted once each process has read them
            wait_for(lambda: _counted(procs[stage]["metrics"], "reliev3r_messages_rejected_total") > 0, 60,
                     f"{stage} to count the rejected messages")
        labeler_pid = procs["labeler"]["pid"]
        os.kill(labeler_pid, signal.SIGKILL)
        # The restarted labeler (a new pid) labels windows again.
        restarted = wait_for(lambda: (p := _processes(run_dir)["labeler"])["pid"] not in (None, labeler_pid) and p,
                             120, "the labeler's restart", procs=[proc])
        wait_for(lambda: (_alive(restarted["pid"])
                          and _counted(restarted["metrics"], "reliev3r_labeler_windows_total") > 0),
                 300, "the restarted labeler to label", procs=[proc])
        assert restarted["restarts"] == 1
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "labeler died (signal SIGKILL)" in out and "restart #1" in out, out[-3000:]


def test_sigterm_stops_everything_cleanly(tmp_path, worlds, wait_for):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, worlds, max_steps=0)  # would run forever
    try:
        wait_for(lambda: _learner_step(run_dir) >= 5, 300, "the learner's first snapshot")
        pids = [p["pid"] for p in _processes(run_dir).values() if p.get("pid")]
        assert len(pids) == 6
        proc.send_signal(signal.SIGTERM)
    finally:
        out = _finish(proc, timeout=120)
    assert proc.returncode == 0, out[-3000:]
    wait_for(lambda: not any(_alive(p) for p in pids), 60, "every child to exit")
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"
    # The learner snapshots on SIGTERM: the newest snapshot is valid and newer than step 5.
    from learner.snapshot import latest_snapshot

    assert latest_snapshot(run_dir / "snapshots") is not None


def test_pipeline_runs_with_curve_keys_and_refuses_keyless_peers(tmp_path, worlds, wait_for):
    """The cross-host setup on one host: every ZeroMQ link under CURVE and frames sent as
    JPEG. With keys from `reliev3r keys` windows flow to the learner and its snapshots are
    scored; a peer without the key gets nothing through and is counted."""
    from reliev3r.cli import main as cli_main

    keys = tmp_path / "keys"
    assert cli_main(["keys", "--out", str(keys)]) == 0
    curve = [f"network.curve.enabled=true", f"network.curve.server_secret_key={keys / 'server.key_secret'}",
             f"network.curve.server_public_key={keys / 'server.key'}",
             f"network.curve.client_secret_key={keys / 'client.key_secret'}",
             f"network.curve.client_public_key={keys / 'client.key'}",
             f"network.curve.authorized_clients={keys / 'authorized_clients'}"]
    run_dir = tmp_path / "run"
    # No step limit: the replay must be serving while it is probed and scraped, whatever the
    # machine's speed (a 20-step run could end first); the test stops the run at the end.
    proc = _start(run_dir, worlds, *curve, "streamer.payload=jpeg", max_steps=0)
    try:
        procs = wait_for(lambda: (p := _processes(run_dir)).get("replay", {}).get("pid") and p, 120, "processes",
                         procs=[proc])
        cfg = rconfig.load([run_dir / "config.yaml"])
        wait_for(lambda: _learner_step(run_dir) >= 5, 300, "the first snapshot", procs=[proc])
        # A keyless and a wrong-key client: their requests are never answered or stored.
        import zmq.auth

        ctx = zmq.Context()
        stranger_public, stranger_secret = zmq.curve_keypair()
        server_public, _ = zmq.auth.load_certificate(keys / "server.key")
        for use_curve in (False, True):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if use_curve:
                sock.curve_publickey, sock.curve_secretkey = stranger_public, stranger_secret
                sock.curve_serverkey = server_public
            sock.connect(f"tcp://127.0.0.1:{cfg.network.replay_port}")
            sock.send_multipart([b"R3W\x01", b"\x83\xa4kind\xa5stats\xa4meta\x80\xa6arrays\x90"], flags=zmq.NOBLOCK)
            assert not sock.poll(1500), "a peer without the right key got an answer"
            sock.close()
        ctx.term()
        wait_for(lambda: _counted(procs["replay"]["metrics"], "reliev3r_auth_failures_total") > 0, 60,
                 "the refused wrong-key peer to be counted", procs=[proc])
        wait_for(lambda: list((run_dir / "evaluations").glob("step-*.json")), 300, "a scored snapshot", procs=[proc])
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out[-4000:]


def test_up_starts_several_labelers_that_share_the_stream(tmp_path, worlds, wait_for):
    """labeler.workers=2: two labeler processes (one per GPU on a GPU host), each with its own
    log, metrics endpoint and heartbeat; both take windows from the one streamer."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, worlds, "labeler.workers=2", "labeler.credits=1", max_steps=0)  # stopped below
    try:
        procs = wait_for(lambda: (p := _processes(run_dir)).get("labeler-1", {}).get("pid") and p, 300,
                         "the second labeler", procs=[proc])
        assert procs["labeler"]["metrics"] != procs["labeler-1"]["metrics"]
        wait_for(lambda: all(_counted(procs[name]["metrics"], "reliev3r_labeler_windows_total") > 0
                             for name in ("labeler", "labeler-1")), 300, "both labelers to label", procs=[proc])
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out[-3000:]
    assert (run_dir / "logs" / "labeler-1.log").is_file()


def test_pretrain_then_a_run_warm_started_from_it(tmp_path, worlds):
    """``reliev3r pretrain`` (configs/pretrain.yaml under the demo sizes) ends with a snapshot
    and prints it; a second run starts from it through ``learner.init``; a model that does not
    fit stops ``up`` before anything starts."""
    import re

    from learner.snapshot import latest_snapshot, verify_snapshot

    out = _finish(_start(tmp_path / "pre", worlds, max_steps=3, command="pretrain"))
    found = re.search(r"learner\.init=(\S+)", out)
    assert found, out[-3000:]
    snap = latest_snapshot(tmp_path / "pre" / "snapshots")
    assert found.group(1) == str(snap.resolve())
    meta = verify_snapshot(snap)
    assert meta["step"] == 3 and meta["final"] is True
    assert meta["config"]["loss"]["kind"] == "supervised" and meta["config"]["schedule"] == "cosine"
    assert meta["config"]["model"]["size"] == "tiny" and meta["init"] is None  # demo sizes, from scratch

    out = _finish(_start(tmp_path / "fine", worlds, f"learner.init={found.group(1)}", max_steps=1))
    assert "learner finished" in out, out[-3000:]
    assert f"learner starting from {found.group(1)}" in out.splitlines()[0], out[:500]
    meta = verify_snapshot(latest_snapshot(tmp_path / "fine" / "snapshots"))
    assert meta["step"] == 1 and meta["config"]["loss"]["kind"] == "weak"
    assert meta["init"]["path"] == str(snap.resolve() / "ema.safetensors")
    assert meta["init"]["sha256"] == verify_snapshot(snap)["files"]["ema.safetensors"]["sha256"]

    bad = subprocess.run([sys.executable, "-m", "reliev3r.cli", "up", f"run.dir={tmp_path / 'bad'}",
                          "learner.model.patch_size=16", f"learner.init={found.group(1)}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "patch_size=8" in bad.stderr and "patch_size=16" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()


def test_two_runs_on_one_host_with_the_default_ports(tmp_path, worlds, wait_for):
    """Two `reliev3r up` on one host at once, neither naming a port: each picks free ZeroMQ and
    metrics ports and records them in its run folder, where `reliev3r status` finds them; both
    end with exit 0."""
    first = _start(tmp_path / "a", worlds, max_steps=0)  # stopped below, once the second has run
    try:
        # The second starts once the first's sockets are all bound (its learner steps), so the
        # free ports it picks cannot be the first's.
        wait_for(lambda: _learner_step(tmp_path / "a") >= 5, 300, "the first run's first snapshot", procs=[first])
        second = _start(tmp_path / "b", worlds, max_steps=3)
        out_b = _finish(second)
        assert second.returncode == 0, out_b[-4000:]
        assert "learner finished" in out_b and "evaluator finished" in out_b
        def status_of_a() -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "reliev3r.cli", "status", "--run-dir", str(tmp_path / "a"),
                                   "--interval", "0"], cwd=ROOT, capture_output=True, text=True, timeout=120)

        # every endpoint of the first run answers (asked again while a busy stage's scrape times out)
        status = wait_for(lambda: (s := status_of_a()).returncode == 0 and s, 300,
                          "every endpoint of the first run to answer `reliev3r status`", procs=[first])
        ports = {run: _processes(tmp_path / run)["supervisor"]["ports"] for run in ("a", "b")}
        assert f"work tcp://127.0.0.1:{ports['a']['network.work_port']}" in status.stdout, status.stdout
    finally:
        out_a = _stop(first)
    assert first.returncode == 0, out_a[-4000:]
    for run in ("a", "b"):
        assert len(set(ports[run].values())) == len(ports[run]) == 3 + 6  # 3 ZeroMQ, 6 metrics, all distinct
        assert rconfig.load([tmp_path / run / "config.yaml"]).network.work_port == ports[run]["network.work_port"]
    assert not set(ports["a"].values()) & set(ports["b"].values())


def test_up_refuses_an_explicit_port_in_use_before_starting_anything(tmp_path):
    """An explicit port another program holds stops `up` at once (exit 2) with a message naming
    the port and the key that sets it; nothing is started."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        for key in ("network.replay_port", "monitoring.ports.learner"):
            run_dir = tmp_path / key
            done = subprocess.run([sys.executable, "-m", "reliev3r.cli", "up", f"run.dir={run_dir}", f"{key}={taken}"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, done.stdout + done.stderr
            assert f"{key}: port {taken} on 127.0.0.1 is already in use" in done.stderr and f"{key}=0" in done.stderr
            assert not run_dir.exists()  # nothing started, nothing written
        # A stage started on its own: the same check, and a ZeroMQ port its peers must know.
        done = subprocess.run([sys.executable, "-m", "reliev3r.cli", "replay", f"run.dir={tmp_path / 'alone'}",
                               f"network.replay_port={taken}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and f"network.replay_port: port {taken}" in done.stderr, done.stderr
        done = subprocess.run([sys.executable, "-m", "reliev3r.cli", "label", f"run.dir={tmp_path / 'alone'}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "network.work_port is 0" in done.stderr, done.stderr
    finally:
        holder.close()


def test_a_crash_looping_stage_says_why_in_the_status_line(tmp_path, worlds, wait_for):
    """A stage that fails at start is restarted with backoff; the status line (not only its log)
    names the error it died of."""
    from reliev3r.supervisor import REASON_CHARS

    run_dir = tmp_path / "run"
    frames = tmp_path / "frames"  # there, so up starts the run; with no image, the evaluator fails at start
    frames.mkdir()
    proc = _start(run_dir, worlds, f"evaluator.data=folder:{frames}", max_steps=2)
    try:
        wait_for(lambda: (_processes(run_dir).get("evaluator") or {}).get("restarts", 0) >= 2, 300,
                 "the evaluator to crash twice", procs=[proc])
    finally:
        out = _stop(proc)
    assert proc.returncode == 0, out[-4000:]
    reason = f"stage failed: FileNotFoundError: {frames}: no images (*.jpg, *.png) in range"
    assert f"evaluator died (exit code 1): {reason}" in out, out[-4000:]
    last = _status_lines(out)[-1]
    assert "restarts " in last and f"evaluator: {reason[:REASON_CHARS]}" in last, last
    assert reason in _processes(run_dir)["evaluator"]["last_error"]


def test_the_evaluator_stops_mid_evaluation_on_sigterm(tmp_path, worlds):
    """A SIGTERM while the evaluator scores a snapshot ends the scoring after the window at hand:
    the process exits 0 without scoring the rest or writing a result. The evaluator runs as a
    real process whose first scored window sends it SIGTERM, so the signal lands mid-evaluation
    on any machine."""
    from tests.tiny_snapshot import make_tiny_snapshot

    run_dir = tmp_path / "run"
    make_tiny_snapshot(run_dir, height=48, width=64, views=3)
    scored = tmp_path / "scored.txt"
    hook = ("import os, signal, sys\n"
            "import evaluation.evaluate as ev\n"
            "score = ev.score_window\n"
            "def scored(*args, **kwargs):\n"
            "    with open(sys.argv[1], 'a') as f:\n"
            "        f.write('window\\n')\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    return score(*args, **kwargs)\n"
            "ev.score_window = scored\n"
            "from reliev3r.cli import main\n"
            "sys.exit(main(sys.argv[2:]))\n")
    done = subprocess.run([sys.executable, "-c", hook, str(scored), "evaluate", "--config",
                           str(ROOT / "configs" / "demo.yaml"), f"run.dir={run_dir}", *SMALL, "evaluator.windows=4",
                           f"evaluator.data=synthetic:{worlds / 'eval_world'}", "monitoring.enabled=false"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    abandoned = [rec for rec in logged if rec["msg"] == "evaluation abandoned on stop"]
    assert abandoned and abandoned[0]["scored"] == 1 and abandoned[0]["windows"] == 4, done.stderr[-3000:]
    assert scored.read_text() == "window\n"  # one window scored of four
    assert not list((run_dir / "evaluations").glob("step-*.json"))


def test_synthetic_videos_open_with_pyav_without_metadata_errors(worlds, monkeypatch):
    """PyAV 19 dropped ``av.open``'s ``metadata_errors``: the streamer's videos failed to open,
    every synthetic source failed, and under `up` the streamer exited 1 at the first labeler's
    request and was restarted in a loop (on a GPU host whose PyAV was 19)."""
    import av

    from streamer.sources import VideoSource

    real_open = av.open

    def open_19(*args, **kwargs):  # what PyAV 19 accepts
        if "metadata_errors" in kwargs or "metadata_encoding" in kwargs:
            raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", open_19)
    errors = []
    video = sorted((worlds / "world").glob("*.mp4"))[0]
    frames = list(VideoSource(video, on_error=lambda *e: errors.append(e)).frames())
    assert not errors and len(frames) == 40 and frames[0].gt_depth is not None


def _log_after(log: Path, offset: int) -> list[dict]:
    """The JSON lines ``log`` gained after ``offset`` bytes (what a later process wrote)."""
    with open(log, "rb") as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().decode().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("moved", [(), ("snapshots",)], ids=["nothing-moved", "snapshots-moved"])
def test_a_refresh_stopped_once_its_teacher_was_whole_finishes_when_resumed(tmp_path, worlds, moved):
    """A run stopped (SIGINT, or the supervisor SIGKILLed) after its refresh's teacher was whole
    but before the first part was moved into ``before-refresh/``: resumed, ``up`` finishes the
    move before any stage starts, so the learner starts afresh on an empty replay and the new
    teacher, as after an uninterrupted refresh. The interrupted state is made, not timed: a
    first part that ended at step 4 (its refresh step out of reach), the teacher then written
    whole into the run (weights, then meta), and (``snapshots-moved``) part of the move done.
    Before the fix the resumed learner went on from the first learner's step 4 and replay
    restored the first teacher's windows."""
    from labelers.embedded import META, WEIGHTS

    run_dir = tmp_path / "run"
    video = sorted((worlds / "world").glob("synth-*.mp4"))[0]
    source = f"streamer.sources=[{run_dir / 'world' / video.name}]"  # footage of the user's: the refresh applies
    durable = "replay.durable=true"  # a replay store on disk, which a resumed replay would restore
    first = _start(run_dir, worlds, source, durable, "labeler.refresh_step=1000", max_steps=4)
    out = _finish(first)
    assert first.returncode == 0 and "teacher refresh at step 1000" in out, out[-3000:]
    assert (run_dir / "snapshots" / "step-000000004" / "meta.json").is_file()
    assert (run_dir / "evaluations" / "step-000000004.json").is_file() and (run_dir / "replay").is_dir()
    (run_dir / "teacher").mkdir()
    shutil.copyfile(WEIGHTS, run_dir / "teacher" / WEIGHTS.name)
    shutil.copyfile(META, run_dir / "teacher" / META.name)  # the meta last: the teacher is whole
    before = run_dir / "before-refresh"
    for name in moved:
        before.mkdir(exist_ok=True)
        os.replace(run_dir / name, before / name)
    offsets = {name: (run_dir / "logs" / f"{name}.log").stat().st_size for name in ("learner", "replay")}

    cmd = [sys.executable, "-m", "reliev3r.cli", "up", "--config", str(ROOT / "configs" / "default.yaml"),
           "--config", str(ROOT / "configs" / "demo.yaml"), "--max-steps", "5", f"run.dir={run_dir}", *SMALL,
           source, durable, "labeler.refresh_step=4"]
    resumed = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    out = _finish(resumed)
    assert resumed.returncode == 0, out[-3000:]
    teacher = run_dir / "teacher" / WEIGHTS.name
    assert f"refreshed to {teacher}" in out.splitlines()[0], out[:500]
    # the first part, whole, in before-refresh (its config the first part's), as after an uninterrupted refresh
    assert (before / "snapshots" / "step-000000004" / "meta.json").is_file()
    assert (before / "evaluations" / "step-000000004.json").is_file()
    assert (before / "replay").is_dir()
    assert rconfig.load([before / "config.yaml"]).labeler.refresh_step == 1000
    # the second learner started from scratch (5 steps, not 1 from the first's 4), on an empty replay
    learner = _log_after(run_dir / "logs" / "learner.log", offsets["learner"])
    assert not any(row["msg"] in ("resumed", "max_steps already reached") for row in learner), learner[:5]
    assert any(row["msg"] == "learner done" and row["step"] == 5 for row in learner), learner[-5:]
    replay = _log_after(run_dir / "logs" / "replay.log", offsets["replay"])
    assert not any(row["msg"] == "replay store restored" for row in replay), replay[:5]
    assert rconfig.load([run_dir / "config.yaml"]).labeler.refresh_step == 4
    assert f"the teacher refresh the run stopped in is finished: the run before it is in {before}" in out, out[:3000]
