#!/usr/bin/env bash
# Embedded depth teachers of several recipes, trained side by side on one GPU host
# (`python -m labelers.teacher_train`, which needs only torch, numpy and safetensors), each for
# BUDGET seconds; their weights and meta go to OUT/teachers.tgz (4 MB each), to be scored on
# 7-Scenes with `python -m studies.embedded_teacher_7scenes --weights FILE --data DIR`.
#
#   BUDGET=400 bash studies/teacher_variants.sh "scale:alignment=scale" "wide:alignment=scale widths=48,64,128,192,256"
#
# Each argument is NAME:OPTIONS (space-separated key=value of labelers.teacher_train's config);
# every run also gets the recipe of the shipped weights (144x192, render_fraction=0.2,
# dining=true) unless its options say otherwise. docs/RESULTS.md, issue 21, has the runs.
set -u
ROOT=$PWD; BUDGET=${BUDGET:-400}; RUNS=${RUNS:-/tmp/teachers}; OUTD=${OUT:-/tmp/out}
mkdir -p "$RUNS" "$OUTD"
export PYTHONPATH=$ROOT PYTHONUNBUFFERED=1
pids=()
for spec in "$@"; do
  name=${spec%%:*}; extra=${spec#*:}
  python3 -m labelers.teacher_train --out "$RUNS/$name" --time-budget "$BUDGET" --steps 100000 --device cuda \
    height=144 width=192 render_fraction=0.2 dining=true $extra > "$RUNS/$name.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
for spec in "$@"; do
  name=${spec%%:*}
  echo "$name: $(tail -n 1 "$RUNS/$name.log")"
done | tee "$OUTD/teachers.txt"
(cd "$RUNS" && tar czf "$OUTD/teachers.tgz" */embedded_depth.safetensors */embedded_depth.json *.log)
