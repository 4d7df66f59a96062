#!/usr/bin/env bash
# The two accuracy studies in one device call (one H100, 16 cores), all runs concurrently:
#  (a) issue 9: synthetic world, oracle labels + real SIFT matches: weak (paper losses),
#      weak + triangulation-consistency term, fully supervised;
#  (b) issue 6: 7-Scenes red kitchen frames 0-449 -> 450-599: weak with the embedded, PyDNet++
#      and oracle teachers, the oracle with the paper losses only, and the supervised sibling.
# The 7-Scenes caches are labelled beforehand on a CPU host (PyDNet++ needs ai-edge-litert) and
# carried in .devdata/datasets; the synthetic ones are labelled here on all cores first.
# usage: benchmarks/study_device.sh OUTDIR   (env: STEPS, MINUTES, BATCH, SCENES, THREADS)
set -u
out=$1
mkdir -p "$out"
py=${PYTHON:-python3}
steps=${STEPS:-3000}; minutes=${MINUTES:-5.5}; batch=${BATCH:-16}; scenes=${SCENES:-200}
common_sets="--set batch_size=$batch --set schedule=cosine --set max_steps=$steps"
syn_train="synthetic:scenes=$scenes,frames=40,hop=2"
syn_eval="synthetic:scenes=16,frames=40,seed=1000,hop=4"
kitchen=${KITCHEN:-/work/shared/data/7scenes-redkitchen}
k_train="7scenes:$kitchen@0-449;stride=10,hop=3"
k_eval="7scenes:$kitchen@450-599;stride=10,hop=3"
pydnet=${PYDNET:-pydnet:/work/shared/models/pydnet++.tflite}

start=$(date +%s)
$py -m learner.study --train "$syn_train" --eval "$syn_eval" --stride 8 --label-only --workers 16 \
    > "$out/label_synthetic.log" 2>&1 || { tail -n 20 "$out/label_synthetic.log"; exit 1; }
echo "synthetic labelled in $(( $(date +%s) - start )) s"

run() {  # name, then learner.study arguments
  local name=$1; shift
  PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-2} $py -m learner.study --views 4 --height 48 --width 64 \
      --steps "$steps" --minutes "$minutes" --eval-every "${EVAL_EVERY:-1000}" --threads "${THREADS:-2}" \
      $common_sets "$@" --out "$out/$name" > "$out/$name.log" 2>&1 &
  pids+=($!)
}
pids=()
syn=(--train "$syn_train" --eval "$syn_eval" --stride 8 --eval-windows 48)
run syn_weak "${syn[@]}"
run syn_weak_point "${syn[@]}" --set loss.point_weight=1
run syn_supervised "${syn[@]}" --set loss.kind=supervised
kit=(--train "$k_train" --eval "$k_eval" --eval-windows 40)
run k_embedded_point "${kit[@]}" --teacher embedded --set loss.point_weight=1
run k_pydnet_point "${kit[@]}" --teacher "$pydnet" --set loss.point_weight=1
run k_oracle_point "${kit[@]}" --teacher oracle --set loss.point_weight=1
run k_oracle_paper "${kit[@]}" --teacher oracle
run k_supervised "${kit[@]}" --teacher oracle --set loss.kind=supervised
for p in "${pids[@]}"; do wait "$p"; done
echo "all runs done in $(( $(date +%s) - start )) s"
for log in "$out"/*.log; do
  name=$(basename "$log" .log)
  [ "$name" = label_synthetic ] && continue
  echo "== $name: $(grep -E '^[0-9]+ steps in' "$log")"
  tail -n 1 "$out/$name/table.md" 2>/dev/null || tail -n 5 "$log"
done
