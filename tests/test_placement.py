"""Where the stages run on a shared host: ``run.feeder_nice`` (the stages that feed the learner
lower their CPU priority, threads included; the learner and replay keep theirs) and
``run.learner_cpus`` (whole cores for the learner, the rest for the feeders). Each case in a
fresh process (niceness only goes up; affinity would stay)."""

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
    thread = runtime.spawn(lambda: seen.setdefault("thread", os.getpriority(os.PRIO_PROCESS, threading.get_native_id())), "probe")
    thread.join()
    print(json.dumps({"added": os.nice(0) - before, "thread": seen["thread"] - before}))
"""


@pytest.mark.parametrize("stage, added", [("labeler", 3), ("streamer", 3), ("evaluator", 3), ("learner", 0), ("replay", 0)])
def test_feeders_lower_their_priority_and_their_threads_follow(stage, added):
    if os.nice(0) + 3 > 19:
        pytest.skip("this process already runs at the lowest priority")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RELIEV3R_SUPERVISED", None)
    out = subprocess.run([sys.executable, "-c", PROBE, stage], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"added": added, "thread": added}


def test_feeder_nice_is_checked():
    with pytest.raises(config.ConfigError, match="feeder_nice"):
        config.load([], ["run.feeder_nice=20"])


HYPERTHREADED = {c: {c % 8, c % 8 + 8} for c in range(16)}  # 8 cores x 2 threads, Linux's numbering


@pytest.mark.parametrize("reserved, cpus, siblings, learner", [
    (2, set(range(16)), lambda c: HYPERTHREADED[c], {7, 15}),  # one whole core, from the top
    (3, set(range(16)), lambda c: HYPERTHREADED[c], {6, 7, 14, 15}),  # rounded up to whole cores
    (1, set(range(16)), lambda c: HYPERTHREADED[c], {7, 15}),
    (2, set(range(4)), lambda c: {c}, {2, 3}),  # no hyper-threads
    (2, {0, 1, 8, 9}, lambda c: HYPERTHREADED[c], {1, 9}),  # only the CPUs this process may use
    (1, {0, 8}, lambda c: HYPERTHREADED[c], None),  # one core: nothing left for the feeders
    (4, {0, 1, 2, 3}, lambda c: {c}, None),
])
def test_learner_cpus_are_whole_cores_and_leave_the_rest(reserved, cpus, siblings, learner):
    from reliev3r.service import learner_cpu_split

    split = learner_cpu_split(reserved, cpus, siblings)
    if learner is None:
        assert split is None
    else:
        assert split == (learner, cpus - learner)


AFFINITY = """
import json, os, sys
from reliev3r import config
from reliev3r.service import Runtime
cfg = config.load([], ["run.learner_cpus=1", "monitoring.enabled=false", "network.supervisor_port=0"])
with Runtime(sys.argv[1], cfg):
    print(json.dumps(sorted(os.sched_getaffinity(0))))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this OS")
def test_learner_and_feeders_run_on_their_own_cpus():
    from reliev3r.service import learner_cpu_split, thread_siblings

    cpus = os.sched_getaffinity(0)
    split = learner_cpu_split(1, cpus, thread_siblings)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RELIEV3R_SUPERVISED", None)
    seen = {stage: set(json.loads(subprocess.run([sys.executable, "-c", AFFINITY, stage], capture_output=True,
                                                 text=True, env=env, timeout=60, check=True).stdout.splitlines()[-1]))
            for stage in ("learner", "labeler", "replay")}
    assert seen["replay"] == cpus  # replay serves both sides: it keeps every CPU
    if split is None:  # a host of one physical core: no reservation
        assert seen["learner"] == seen["labeler"] == cpus
    else:
        assert (seen["learner"], seen["labeler"]) == split
