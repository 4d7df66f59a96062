"""``reliev3r pretrain``: the normal pipeline with configs/pretrain.yaml (supervised, synthetic
world) ends with a snapshot and prints its path, and a second run starts from it through
``learner.init``."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from learner.snapshot import latest_snapshot, verify_snapshot
from test_pipeline import ROOT, SMALL, _finish, worlds  # noqa: F401  (worlds: the session's rendered world)

pytestmark = pytest.mark.slow


def _run(command: str, run_dir, worlds, *extra: str, max_steps: int) -> subprocess.Popen:  # noqa: F811
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in ("world", "eval_world"):
        (run_dir / name).symlink_to(worlds / name)
    ports = [f"network.{k}=0" for k in ("work_port", "replay_port", "supervisor_port")]
    ports += [f"monitoring.ports.{s}=0" for s in ("supervisor", "streamer", "labeler", "replay", "learner", "evaluator")]
    cmd = [sys.executable, "-m", "reliev3r.cli", command, "--config", str(ROOT / "configs" / "demo.yaml"),
           "--max-steps", str(max_steps), f"run.dir={run_dir}", *ports, *SMALL, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def test_pretrain_then_warm_start(tmp_path, worlds):  # noqa: F811
    out = _finish(_run("pretrain", tmp_path / "pre", worlds, max_steps=3))
    found = re.search(r"learner\.init=(\S+)", out)
    assert found, out[-3000:]
    snap = latest_snapshot(tmp_path / "pre" / "snapshots")
    assert found.group(1) == str(snap.resolve())
    meta = verify_snapshot(snap)
    assert meta["step"] == 3 and meta["final"] is True
    assert meta["config"]["loss"]["kind"] == "supervised" and meta["config"]["schedule"] == "cosine"
    assert meta["config"]["model"]["size"] == "tiny" and meta["init"] is None  # demo sizes, from scratch

    out = _finish(_run("up", tmp_path / "fine", worlds, f"learner.init={found.group(1)}", max_steps=1))
    assert "learner finished" in out, out[-3000:]
    meta = verify_snapshot(latest_snapshot(tmp_path / "fine" / "snapshots"))
    assert meta["step"] == 1 and meta["config"]["loss"]["kind"] == "weak"
    assert meta["init"]["path"] == str(snap.resolve() / "ema.safetensors")
    assert meta["init"]["sha256"] == verify_snapshot(snap)["files"]["ema.safetensors"]["sha256"]

    bad = subprocess.run([sys.executable, "-m", "reliev3r.cli", "up", f"run.dir={tmp_path / 'bad'}",
                          "learner.model.patch_size=16", f"learner.init={found.group(1)}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "patch_size=8" in bad.stderr and "patch_size=16" in bad.stderr, bad.stderr
