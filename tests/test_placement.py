"""``run.feeder_nice``: the stages that feed the learner lower their CPU priority, threads
included; the learner and replay keep theirs. Each case in a fresh process (niceness only goes
up)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reliev3r import config

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, os, sys, threading
from reliev3r import config
from reliev3r.service import Runtime
cfg = config.load([], ["run.feeder_nice=3", "monitoring.enabled=false", "network.supervisor_port=0"])
before = os.nice(0)
with Runtime(sys.argv[1], cfg) as runtime:
    seen = {}
    thread = runtime.spawn(
        lambda: seen.setdefault("thread", os.getpriority(os.PRIO_PROCESS, threading.get_native_id())), "probe")
    thread.join()
    print(json.dumps({"added": os.nice(0) - before, "thread": seen["thread"] - before}))
"""


@pytest.mark.parametrize("stage, added", [("labeler", 3), ("streamer", 3), ("evaluator", 3), ("learner", 0),
                                          ("replay", 0)])
def test_feeders_lower_their_priority_and_their_threads_follow(stage, added):
    added = min(os.nice(0) + added, 19) - os.nice(0)  # the kernel stops at the lowest priority, 19
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RELIEV3R_SUPERVISED", None)
    out = subprocess.run([sys.executable, "-c", PROBE, stage], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"added": added, "thread": added}


def test_feeder_nice_is_checked():
    with pytest.raises(config.ConfigError, match="feeder_nice"):
        config.load([], ["run.feeder_nice=20"])

