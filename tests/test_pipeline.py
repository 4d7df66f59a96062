"""The whole pipeline as real processes: ``reliev3r up`` on the embedded synthetic world.

One small world is rendered once per session and linked into each run folder. Each test
starts the real supervisor in a subprocess (every stage its own process, real ZeroMQ on
127.0.0.1, free ports) and checks what an operator would: exit code, status lines,
snapshots, evaluation results, restarts after SIGKILL, rejection of malformed messages, and
no processes left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import zmq

from reliev3r import config as rconfig
from reliev3r.synthetic import ensure_world
from streamer.config import SyntheticConfig

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

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
    ports = [f"network.{k}=0" for k in ("work_port", "replay_port", "supervisor_port")]
    ports += [f"monitoring.ports.{s}=0" for s in ("supervisor", "streamer", "labeler", "replay", "learner", "evaluator")]
    cmd = [sys.executable, "-m", "reliev3r.cli", command, "--config", str(ROOT / "configs" / "default.yaml"),
           "--config", str(ROOT / "configs" / "demo.yaml"), "--max-steps", str(max_steps),
           f"run.dir={run_dir}", *ports, *SMALL, *extra]
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
    assert (run_dir / "snapshots" / "step-000000008" / "meta.json").is_file()
    assert not list((run_dir / "snapshots").glob("*.tmp*")), "half-written snapshot left behind"


def test_labeler_sigkill_is_restarted_and_malformed_messages_are_counted(tmp_path, worlds, wait_for):
    run_dir = tmp_path / "run"
    proc = _start(run_dir, worlds, max_steps=25)
    try:
        procs = wait_for(lambda: (p := _processes(run_dir)).get("labeler", {}).get("pid") and _learner_step(run_dir) >= 5 and p,
                          300, "the learner's first snapshot")
        cfg = rconfig.load([run_dir / "config.yaml"])
        # Garbage to every bound socket: streamer ROUTER, replay ROUTER, supervisor PULL.
        ctx = zmq.Context()
        for port, kind in ((cfg.network.work_port, zmq.DEALER), (cfg.network.replay_port, zmq.DEALER),
                           (cfg.network.supervisor_port, zmq.PUSH)):
            sock = ctx.socket(kind)
            sock.connect(f"tcp://127.0.0.1:{port}")
            sock.send_multipart([b"R3W\x01", b"\xc1 not msgpack"])
            sock.send_multipart([b"hello"])
            sock.close(linger=1000)
        ctx.term()
        labeler_pid = procs["labeler"]["pid"]
        os.kill(labeler_pid, signal.SIGKILL)
        time.sleep(2)
        for stage in ("streamer", "replay", "supervisor"):
            text = _scrape(procs[stage]["metrics"])
            rejected = [line for line in text.splitlines()
                        if line.startswith("reliev3r_messages_rejected_total") and not line.endswith(" 0.0")]
            assert rejected, f"{stage} counted no rejected message:\n{text[-2000:]}"
    finally:
        out = _finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "labeler died (signal SIGKILL); restart #1" in out
    assert _processes(run_dir)["labeler"]["pid"] != labeler_pid
    assert json.loads(sorted((run_dir / "evaluations").glob("step-*.json"))[-1].read_text())["step"] == 25


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
    wait_for(lambda: not any(_alive(p) for p in pids), 10, "every child to exit")
    assert not list(run_dir.rglob("*.tmp")), "temporary files left behind"
    # The learner snapshots on SIGTERM: the newest snapshot is valid and newer than step 5.
    from learner.snapshot import latest_snapshot

    assert latest_snapshot(run_dir / "snapshots") is not None


def test_pipeline_runs_with_curve_keys_and_refuses_keyless_peers(tmp_path, worlds, wait_for):
    """The cross-host setup on one host: every ZeroMQ link under CURVE and frames sent as
    JPEG. With keys from `reliev3r keys` the run completes; a peer without the key gets
    nothing through and is counted."""
    from reliev3r.cli import main as cli_main

    keys = tmp_path / "keys"
    assert cli_main(["keys", "--out", str(keys)]) == 0
    curve = [f"network.curve.enabled=true", f"network.curve.server_secret_key={keys / 'server.key_secret'}",
             f"network.curve.server_public_key={keys / 'server.key'}",
             f"network.curve.client_secret_key={keys / 'client.key_secret'}",
             f"network.curve.client_public_key={keys / 'client.key'}",
             f"network.curve.authorized_clients={keys / 'authorized_clients'}"]
    run_dir = tmp_path / "run"
    # Probe early in a longer run: probing takes ~3 s, and the replay must still be serving
    # (with the learner 1 step from the end, the run could finish and reset the scrape).
    steps = 20
    proc = _start(run_dir, worlds, *curve, "streamer.payload=jpeg", max_steps=steps)
    try:
        procs = wait_for(lambda: (p := _processes(run_dir)).get("replay", {}).get("pid") and p, 120, "processes")
        cfg = rconfig.load([run_dir / "config.yaml"])
        wait_for(lambda: _learner_step(run_dir) >= 2 or proc.poll() is not None, 300, "the first snapshot")
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
        text = _scrape(procs["replay"]["metrics"])
        failures = [ln for ln in text.splitlines() if ln.startswith("reliev3r_auth_failures_total") and not ln.endswith(" 0.0")]
        assert failures, "the refused wrong-key peer was not counted"
    finally:
        out = _finish(proc)
    assert proc.returncode == 0, out[-4000:]
    assert json.loads(sorted((run_dir / "evaluations").glob("step-*.json"))[-1].read_text())["step"] == steps


def test_up_starts_several_labelers_that_share_the_stream(tmp_path, worlds, wait_for):
    """labeler.workers=2: two labeler processes (one per GPU on a GPU host), each with its own
    log, metrics endpoint and heartbeat; both take windows from the one streamer."""
    run_dir = tmp_path / "run"
    proc = _start(run_dir, worlds, "labeler.workers=2", "labeler.credits=1", max_steps=8)
    try:
        procs = wait_for(lambda: (p := _processes(run_dir)).get("labeler-1", {}).get("pid")
                          and _learner_step(run_dir) >= 5 and p, 300, "the first snapshot")
        assert procs["labeler"]["metrics"] != procs["labeler-1"]["metrics"]

        def windows(name: str) -> float:
            text = _scrape(procs[name]["metrics"])
            return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("reliev3r_labeler_windows_total{"))

        wait_for(lambda: windows("labeler") > 0 and windows("labeler-1") > 0, 60, "both labelers to label")
    finally:
        out = _finish(proc)
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
    meta = verify_snapshot(latest_snapshot(tmp_path / "fine" / "snapshots"))
    assert meta["step"] == 1 and meta["config"]["loss"]["kind"] == "weak"
    assert meta["init"]["path"] == str(snap.resolve() / "ema.safetensors")
    assert meta["init"]["sha256"] == verify_snapshot(snap)["files"]["ema.safetensors"]["sha256"]

    bad = subprocess.run([sys.executable, "-m", "reliev3r.cli", "up", f"run.dir={tmp_path / 'bad'}",
                          "learner.model.patch_size=16", f"learner.init={found.group(1)}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "patch_size=8" in bad.stderr and "patch_size=16" in bad.stderr, bad.stderr
    assert not (tmp_path / "bad").exists()
