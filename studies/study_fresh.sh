#!/usr/bin/env bash
# Issue 9, "learning works": train on a stream of fresh scenes (studies.fresh: every window a new
# procedural scene, oracle relative-depth labels, real SIFT matches) instead of a fixed set, and
# score the held-out scenes of sweeps 2-3 (seed 1000, 40-frame clips, views 8 frames apart).
# One producer feeds every run, so the weak runs and their fully-supervised siblings see the same
# windows. Runs are given as NAME|OVERRIDES arguments (OVERRIDES: --set ... flags).
#
# usage: studies/study_fresh.sh OUTDIR "NAME|--set k=v ..." ...
# (run from the repository root)
#   env: STRIDE (frames between views, 8), HELD (held-out spec), MINUTES (per run, default 7), WORKERS (producer processes, 11),
#        LABEL_WORKERS (processes labelling the held-out set, 0: one per CPU), BATCH (16), THREADS (1), PYTHON,
#        CAPACITY (4096 windows in each run's ring), EVAL_EVERY (500), GPUS (runs go round-robin
#        over this many GPUs through CUDA_VISIBLE_DEVICES; default 1), FIRST (the producer's first
#        scene index, 0: a resumed run, OVERRIDES with --resume, starts past the scenes it saw)
set -u
out=$1; shift
mkdir -p "$out"
py=${PYTHON:-python3}
minutes=${MINUTES:-7}; batch=${BATCH:-16}
train="synthetic:frames=40,seed=7"
held=${HELD:-synthetic:scenes=16,frames=40,seed=1000,hop=4}
common=(--views 4 --height 48 --width 64 --stride "${STRIDE:-8}")
start=$(date +%s)
$py -m studies.study --train "$train" --eval "$held" "${common[@]}" --stream "$out/windows" --label-only \
    --workers "${LABEL_WORKERS:-0}" \
    > "$out/label_held_out.log" 2>&1 || { tail -n 20 "$out/label_held_out.log"; exit 1; }
echo "held-out labelled in $(( $(date +%s) - start )) s"
PYTHONUNBUFFERED=1 $py -m studies.fresh --out "$out/windows" --spec "$train" "${common[@]}" \
    --workers "${WORKERS:-11}" --first-index "${FIRST:-0}" > "$out/producer.log" 2>&1 &
producer=$!
pids=(); k=0
for run in "$@"; do
  name=${run%%|*}; overrides=${run#*|}
  gpu=$(( k % ${GPUS:-1} )); k=$(( k + 1 ))
  # shellcheck disable=SC2086  # the overrides are flags, split on purpose
  CUDA_VISIBLE_DEVICES=$gpu PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-1} $py -m studies.study "${common[@]}" --eval "$held" \
      --stream "$out/windows" --capacity "${CAPACITY:-4096}" --min-windows 256 --eval-windows 48 \
      --steps 1000000 --minutes "$minutes" --eval-every "${EVAL_EVERY:-500}" --threads "${THREADS:-1}" \
      --set batch_size=$batch $overrides --out "$out/$name" > "$out/$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
kill -TERM "$producer"; wait "$producer"
echo "all runs done in $(( $(date +%s) - start )) s; $(tail -n 2 "$out/producer.log" | head -n 1)"
for run in "$@"; do
  name=${run%%|*}
  echo "== $name: $(grep -E '^[0-9]+ steps in' "$out/$name.log")"
  tail -n 1 "$out/$name/table.md" 2>/dev/null || tail -n 5 "$out/$name.log"
done
