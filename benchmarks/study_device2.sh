#!/usr/bin/env bash
# Follow-up of study_device.sh (issue 9): does pose generalisation move with scene diversity or
# model size? 400 synthetic scenes of 32 frames (2 windows each: twice the scenes of the first
# sweep, half the windows), tiny and small models, supervised sibling and weak + point term,
# scored on the same held-out scenes as the first sweep.
# usage: benchmarks/study_device2.sh OUTDIR   (env: STEPS, MINUTES, BATCH, SCENES, THREADS)
set -u
out=$1
mkdir -p "$out"
py=${PYTHON:-python3}
steps=${STEPS:-1500}; minutes=${MINUTES:-2.8}; batch=${BATCH:-16}; scenes=${SCENES:-400}
syn_train="synthetic:scenes=$scenes,frames=32,hop=4,seed=7"
syn_eval="synthetic:scenes=16,frames=40,seed=1000,hop=4"
start=$(date +%s)
$py -m learner.study --train "$syn_train" --eval "$syn_eval" --stride 8 --label-only --workers 16 \
    > "$out/label_synthetic.log" 2>&1 || { tail -n 20 "$out/label_synthetic.log"; exit 1; }
echo "synthetic labelled in $(( $(date +%s) - start )) s"
pids=()
run() {
  local name=$1; shift
  PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-3} $py -m learner.study --views 4 --height 48 --width 64 \
      --train "$syn_train" --eval "$syn_eval" --stride 8 --eval-windows 48 --steps "$steps" --minutes "$minutes" \
      --eval-every "${EVAL_EVERY:-500}" --threads "${THREADS:-3}" --set batch_size=$batch --set schedule=cosine \
      --set max_steps=$steps "$@" --out "$out/$name" > "$out/$name.log" 2>&1 &
  pids+=($!)
}
run d_sup_tiny --set loss.kind=supervised
run d_sup_small --set loss.kind=supervised --set model.size=small
run d_point_tiny --set loss.point_weight=1
run d_point_small --set loss.point_weight=1 --set model.size=small
for p in "${pids[@]}"; do wait "$p"; done
echo "all runs done in $(( $(date +%s) - start )) s"
for log in "$out"/d_*.log; do
  name=$(basename "$log" .log)
  echo "== $name: $(grep -E '^[0-9]+ steps in' "$log")"
  tail -n 1 "$out/$name/table.md" 2>/dev/null || tail -n 5 "$log"
done
