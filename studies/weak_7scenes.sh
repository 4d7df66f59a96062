#!/usr/bin/env bash
# Weak learning on real video through the product path, several runs side by side on one GPU host:
# `reliev3r up --config configs/gpu.yaml` on 7-Scenes frames 0-449 (an image-sequence archive) for
# the same number of steps each, then `reliev3r eval` on frames 450-599 (nobody trains on them),
# each weak run beside the supervised sibling named `sup`, and a table of the results.
#
#   python -m studies.prepare_7scenes --out .devdata     # here: 11 MB of frames to carry
#   # on the device, from the repository root (carry .devdata and the wheels it lacks):
#   STEPS=800 WALL=330 bash studies/weak_7scenes.sh "default:" "sup:learner.loss.kind=supervised" \
#       "oracle:labeler.teacher=oracle" "oracle2:labeler.teacher=oracle?strength=2"
#
# PyDNet++ as the teacher: put its runtime in a second wheel folder and the model beside the data,
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
#       --platform manylinux_2_28_x86_64 --platform any --no-deps -d .whl-tflite \
#       ai-edge-litert==1.4.0 flatbuffers ml_dtypes backports.strenum
#   cp ../shared/models/pydnet++.tflite .devdata/
# and give the run "pyd:labeler.teacher=pydnet:.devdata/pydnet++.tflite labeler.workers=4" (it runs
# on the CPU, about 0.3 s a frame). Carry .whl, .whl-tflite, .devdata/7s-train, .devdata/7s-eval
# and .devdata/pydnet++.tflite: 56.3 MiB, 62.6 with the tree, of the 64 MiB a call may carry.
# Image folders train without PyAV: a wheel folder with pyzmq alone (`pip download ... -d
# .whl-zmq pyzmq`, WHEELS=".whl-zmq .whl-tflite") leaves room for a distilled teacher's weights.
#
# Distillation (`reliev3r teacher-train --distill`): DISTILL=NAME distils run NAME's learner, on the
# training frames, into a teacher fine-tuned from the shipped weights for DISTILL_S seconds (default
# 150) on DISTILL_DEVICE (default cuda) once training has stopped; the weights go to $OUT/teacher (4 MB: bring them back
# and carry them into the next call as "dst:labeler.teacher=embedded:PATH"), and every run's eval
# also scores that teacher alone on the held-out frames. E.g. (one call, then the next):
#   DISTILL=dflt STEPS=1500 WALL=400 bash studies/weak_7scenes.sh "sup:learner.loss.kind=supervised" "dflt:" \
#       "pyd:labeler.teacher=pydnet:.devdata/pydnet++.tflite labeler.workers=4"
#   STEPS=1500 WALL=420 bash studies/weak_7scenes.sh "sup:learner.loss.kind=supervised" "dflt:" \
#       "dst:labeler.teacher=embedded:.devdata/teacher/embedded_depth.safetensors"
#
# On a CPU host: CONFIG=configs/demo.yaml SERIAL=1 (one run after another, each stopped WALL seconds
# after its own start; THREADS=1; python3 must be the venv's), e.g. the curve of weak quality
# against the oracle's error:
#   PATH=$PWD/.venv/bin:$PATH CONFIG=configs/demo.yaml SERIAL=1 THREADS=1 WHEELS=none STEPS=1200 WALL=1200 \
#       bash studies/weak_7scenes.sh \
#       "or0:labeler.teacher=oracle" "or1:labeler.teacher=oracle?strength=1" ...
#
# configs/gpu.yaml refreshes its teacher at step 250 (labeler.refresh_step): a weak run is then
# 250 steps, a 70 s distillation and STEPS more from scratch (STEPS=1500: about 340 s beside
# two other runs; give WALL room), and its evaluation also scores the teacher the refresh made.
# labeler.refresh_step=0 is the run without it; the supervised and oracle runs never refresh.
# configs/demo.yaml (CONFIG, on a CPU host) refreshes at step 300 for 150 s.
#
# A warm start (`learner.init`): PRETRAIN=N first runs `reliev3r pretrain --config CONFIG --max-steps N`
# (supervised on the synthetic world; stopped with a final snapshot PRETRAIN_WALL seconds after its
# start, default 240; its log is $RUNS/pre.log), and @PRE in a run's overrides names the snapshot
# it wrote. Weak from scratch and warm at equal steps, beside the sibling:
#   PRETRAIN=4000 PRETRAIN_WALL=240 STEPS=1500 WALL=420 bash studies/weak_7scenes.sh \
#       "sup:learner.loss.kind=supervised" "dflt:" "warm:learner.init=@PRE"
#
# Each argument is NAME:OVERRIDES (space-separated `key=value`; NAME `sup` is the sibling every
# other run is compared with). Runs stop at STEPS learner steps, or are stopped (SIGINT: a final
# snapshot) WALL seconds after the start. WHEELS: folders of wheels to install first (default
# ".whl .whl-tflite"; absent or empty ones are skipped; a site.tar.xz of benchmarks/pack_site.py in one
# is unpacked); DATA: the folder of studies.prepare_7scenes (default .devdata);
# RUNS: the runs' parent folder (default /tmp/runs; a run folder already there is refused: on a
# machine kept warm between calls it would resume at its last step and be scored again);
# OUT: where summary.txt and runs.tgz (logs and evaluation tables; no weights, images or
# rendered worlds, so that it stays under the 16 MiB a file may bring back) go (default /tmp/out).
# docs/RESULTS.md, "Issue 21", has the runs of 2026-12-04 and their commands.
set -u
ROOT=$PWD; DATA=$(realpath "${DATA:-.devdata}")
export PYTHONPATH=$ROOT
. "$ROOT/studies/device_site.sh"
# shellcheck disable=SC2086  # WHEELS is a list of folders
device_site python3 ${WHEELS:-.whl .whl-tflite} || exit 1
set -f  # overrides such as labeler.teacher=oracle?strength=2 are not globs
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-2}
RUNS=${RUNS:-/tmp/runs}; OUTD=${OUT:-/tmp/out}; mkdir -p "$RUNS" "$OUTD"
WALL=${WALL:-400}; STEPS=${STEPS:-800}
COMMON="--config $ROOT/${CONFIG:-configs/gpu.yaml} streamer.sources=[$DATA/7s-train] replay.dedup=false
 evaluator.data=7scenes:$DATA/7s-eval evaluator.windows=4"
for spec in "$@"; do  # a run folder left by an earlier call would resume at its last step
  [ -e "$RUNS/${spec%%:*}" ] && { echo "$RUNS/${spec%%:*} exists (an earlier call's run): set RUNS to a new folder" >&2; exit 2; }
done
PRE=""; t0=$(date +%s)
if [ -n "${PRETRAIN:-}" ]; then
  [ -e "$RUNS/pre" ] && { echo "$RUNS/pre exists (an earlier call's pretraining): set RUNS to a new folder" >&2; exit 2; }
  timeout -k 60 -s INT "${PRETRAIN_WALL:-240}" python3 -m reliev3r.cli pretrain --config "$ROOT/${CONFIG:-configs/gpu.yaml}" \
    run.dir="$RUNS/pre" --max-steps "$PRETRAIN" > "$RUNS/pre.log" 2>&1
  PRE=$(find "$RUNS/pre/snapshots" -maxdepth 1 -name 'step-*' 2>/dev/null | sort | tail -n 1)  # no globs here (set -f)
  [ -n "$PRE" ] || { echo "the pretraining left no snapshot: $RUNS/pre.log" >&2; tail -n 20 "$RUNS/pre.log" >&2; exit 1; }
  echo "pretrained for $(( $(date +%s) - t0 )) s: $PRE"
  set -- "${@//@PRE/$PRE}"  # the runs' overrides name its snapshot
fi
pids=()
start() {  # NAME:OVERRIDES -> one `reliev3r up` in its own process group, its pid appended to pids
  local name=${1%%:*} extra=${1#*:}
  setsid python3 -m reliev3r.cli up $COMMON run.dir="$RUNS/$name" $extra --max-steps "$STEPS" \
    > "$RUNS/$name.up.log" 2>&1 &
  pids+=($!)
}
alive() { for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
stop() {  # SIGINT (a final snapshot), then SIGKILL a minute later
  for p in "${pids[@]}"; do kill -INT -- "-$p" 2>/dev/null; done
  for _ in $(seq 60); do alive || break; sleep 1; done
  for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done
}
t0=$(date +%s)  # training starts (after any pretraining)
if [ -n "${SERIAL:-}" ]; then  # one run at a time (a CPU host), each stopped WALL seconds after its start
  for spec in "$@"; do
    pids=(); start "$spec"; t1=$(date +%s)
    while alive && [ $(( $(date +%s) - t1 )) -lt "$WALL" ]; do sleep 5; done
    stop
  done
else
  for spec in "$@"; do start "$spec"; done
  while alive && [ $(( $(date +%s) - t0 )) -lt "$WALL" ]; do sleep 5; done
  stop
fi
echo "training ended after $(( $(date +%s) - t0 )) s"
teachers=()
if [ -n "${DISTILL:-}" ]; then
  python3 -m reliev3r.cli teacher-train --distill "$RUNS/$DISTILL" --frames "7scenes:$DATA/7s-train" \
    --out "$OUTD/teacher" --device "${DISTILL_DEVICE:-cuda}" --time-budget "${DISTILL_S:-150}" --steps 100000 \
    init="$ROOT/labelers/weights/embedded_depth.safetensors" height=144 width=192 render_fraction=0.2 dining=true lr=0.0005 warmup=100 \
    > "$RUNS/distill.log" 2>&1 && teachers=(--teacher "embedded:$OUTD/teacher/embedded_depth.safetensors")
  tail -n 1 "$RUNS/distill.log"
fi
for spec in "$@"; do
  name=${spec%%:*}; extra=${spec#*:}
  compare=""  # the sibling, where it left a snapshot (a sibling that never trained fails no one else's eval)
  [ "$name" != sup ] && find "$RUNS/sup/snapshots" -maxdepth 1 -name 'step-*' 2>/dev/null | grep -q . \
    && compare="--compare $RUNS/sup"
  teacher=embedded
  for word in $extra; do case "$word" in labeler.teacher=*) teacher=${word#labeler.teacher=};; esac; done
  refreshed=(); [ -f "$RUNS/$name/teacher/embedded_depth.json" ] \
    && refreshed=(--teacher "embedded:$RUNS/$name/teacher/embedded_depth.safetensors")  # the run's own, after a refresh
  python3 -m reliev3r.cli eval --checkpoint "$RUNS/$name" --data "7scenes:$DATA/7s-eval" --windows 24 $compare \
    --teacher "$teacher" ${refreshed[@]+"${refreshed[@]}"} ${teachers[@]+"${teachers[@]}"} --out "$RUNS/$name/final_eval" $COMMON run.dir="$RUNS/$name" $extra \
    > "$RUNS/$name.eval.log" 2>&1 &
done
wait
python3 - "$RUNS" "$@" <<'PY' | tee "$OUTD/summary.txt"
import json, pathlib, sys

runs, keys = pathlib.Path(sys.argv[1]), ["absrel_med", "absrel_lsq", "absrel_lsq_frame", "rra30", "rta30", "auc30", "ate"]
print("| run | step | " + " | ".join(keys) + " | absrel_med / sup [95 %] | auc30 / sup [95 %] | refresh: distil steps |")
baselines = []


def ratio(result, key):  # the paired interval over the windows of the run over the sibling (reliev3r eval)
    name = next(iter(result["rows"]))
    for row, cells in result.get("intervals", {}).items():
        if row.startswith(f"{name} / compare") and cells.get(key):
            return "{:.2f}x [{:.2f}, {:.2f}]".format(*cells[key])
    return "-"


def distilled(name):  # the refresh's optimiser steps: runs side by side share the GPU while they distil
    meta = runs / name / "teacher" / "embedded_depth.json"
    return str(json.loads(meta.read_text()).get("steps", "-")) if meta.is_file() else "-"


for spec in sys.argv[2:]:
    name = spec.split(":")[0]
    path = runs / name / "final_eval" / "results.json"
    if not path.exists():
        print(f"| {name} | no evaluation |")
        continue
    result = json.loads(path.read_text())
    rows = list(result["rows"].items())
    baselines += [row for row in rows[1:] if row[0].startswith("baseline") and row not in baselines]
    print(f"| {name} | {result['step']} | " + " | ".join(f"{rows[0][1].get(k, float('nan')):.3f}" for k in keys)
          + f" | {ratio(result, 'absrel_med')} | {ratio(result, 'auc30')} | {distilled(name)} |")
for label, row in baselines:
    print(f"| {label} | | " + " | ".join(f"{row[k]:.3f}" if k in row else "-" for k in keys) + " |")
PY
(cd "$(dirname "$RUNS")" && tar czf "$OUTD/runs.tgz" --exclude='*.safetensors' --exclude='replay*' \
  --exclude='*.png' --exclude='*.npz' --exclude='*.mp4' "$(basename "$RUNS")" 2>/dev/null)
