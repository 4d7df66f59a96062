#!/usr/bin/env bash
# Parallel learner studies on one GPU (tiny models do not fill it), then a summary table.
# usage: studies/learner_study_sweep.sh OUTDIR MINUTES "name|--set a=b ..." ...
# The labelled datasets must already be cached under .devdata/datasets (studies.study --label-only). Run from the repository root.
set -u
out=$1; minutes=$2; shift 2
mkdir -p "$out"
# TRAIN (dataset spec), EVAL_EVERY, EVAL_WINDOWS, THREADS (torch CPU threads per process: the
# default of one per core oversubscribes the host with several processes) from the environment.
common="--train ${TRAIN:-synthetic:scenes=24,frames=40} --stride 8 --views 4 --height 48 --width 64
        --steps 1000000 --minutes $minutes --eval-every ${EVAL_EVERY:-500} --eval-windows ${EVAL_WINDOWS:-32}
        --threads ${THREADS:-2} --set batch_size=8 ${EVAL:+--eval $EVAL}"
pids=()
for cfg in "$@"; do
  name=${cfg%%|*}; extra=${cfg#*|}
  PYTHONUNBUFFERED=1 ${PYTHON:-python3} -m studies.study $common $extra --out "$out/$name" > "$out/$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for cfg in "$@"; do
  name=${cfg%%|*}
  echo "== $name: $(grep -E '^[0-9]+ steps in' "$out/$name.log")"
  tail -n 1 "$out/$name/table.md" 2>/dev/null || tail -n 5 "$out/$name.log"
done
head -n 3 "$out/$(echo "${1%%|*}")/table.md"
