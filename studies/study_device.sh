#!/usr/bin/env bash
# Accuracy studies in one device call, all runs of a sweep concurrently, then a summary.
#   SWEEP=first (default): issue 9 and issue 6 together (first run on one H100, 16 cores):
#    (a) synthetic world, oracle labels + real SIFT matches: weak (paper losses),
#        weak + triangulation-consistency term, fully supervised;
#    (b) 7-Scenes red kitchen frames 0-449 -> 450-599: weak with the embedded, PyDNet++ and
#        oracle teachers, the oracle with the paper losses only, and the supervised sibling.
#        The 7-Scenes caches are labelled beforehand on a CPU host (PyDNet++ needs
#        ai-edge-litert) and carried in .devdata/datasets.
#   SWEEP=diversity: the follow-up (issue 9): does pose generalisation move with scene diversity
#        or model size? 400 synthetic scenes of 32 frames (2 windows each: twice the scenes of
#        the first sweep, half the windows), tiny and small models, supervised sibling and weak +
#        point term, scored on the same held-out scenes as the first sweep.
# The synthetic caches are labelled here first, on LABEL_WORKERS processes (0: one per CPU).
# usage: studies/study_device.sh OUTDIR   (run from the repository root)
#   env: SWEEP, STEPS, MINUTES, BATCH, SCENES, THREADS (torch threads per run), EVAL_EVERY,
#        LABEL_WORKERS, PYTHON, KITCHEN (7-Scenes folder), PYDNET (teacher spec),
#        RELIEV3R_SHARED (where KITCHEN and PYDNET default to live: ../shared)
set -u
out=$1
mkdir -p "$out"
py=${PYTHON:-python3}
sweep=${SWEEP:-first}
shared=${RELIEV3R_SHARED:-../shared}
syn_eval="synthetic:scenes=16,frames=40,seed=1000,hop=4"
case $sweep in
  first) steps=${STEPS:-3000}; minutes=${MINUTES:-5.5}; scenes=${SCENES:-200}; threads=${THREADS:-2}
         every=${EVAL_EVERY:-1000}; syn_train="synthetic:scenes=$scenes,frames=40,hop=2" ;;
  diversity) steps=${STEPS:-1500}; minutes=${MINUTES:-2.8}; scenes=${SCENES:-400}; threads=${THREADS:-3}
         every=${EVAL_EVERY:-500}; syn_train="synthetic:scenes=$scenes,frames=32,hop=4,seed=7" ;;
  *) echo "unknown SWEEP=$sweep (first, diversity)"; exit 2 ;;
esac
batch=${BATCH:-16}

start=$(date +%s)
$py -m studies.study --train "$syn_train" --eval "$syn_eval" --stride 8 --label-only --workers "${LABEL_WORKERS:-0}" \
    > "$out/label_synthetic.log" 2>&1 || { tail -n 20 "$out/label_synthetic.log"; exit 1; }
echo "synthetic labelled in $(( $(date +%s) - start )) s"

names=()
pids=()
run() {  # name, then studies.study arguments
  local name=$1; shift
  PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$threads $py -m studies.study --views 4 --height 48 --width 64 \
      --steps "$steps" --minutes "$minutes" --eval-every "$every" --threads "$threads" \
      --set batch_size="$batch" --set schedule=cosine --set max_steps="$steps" "$@" \
      --out "$out/$name" > "$out/$name.log" 2>&1 &
  pids+=($!)
  names+=("$name")
}
syn=(--train "$syn_train" --eval "$syn_eval" --stride 8 --eval-windows 48)
if [ "$sweep" = first ]; then
  kitchen=${KITCHEN:-$shared/data/7scenes-redkitchen}
  pydnet=${PYDNET:-pydnet:$shared/models/pydnet++.tflite}
  kit=(--train "7scenes:$kitchen@0-449;stride=10,hop=3" --eval "7scenes:$kitchen@450-599;stride=10,hop=3"
       --eval-windows 40)
  run syn_weak "${syn[@]}"
  run syn_weak_point "${syn[@]}" --set loss.point_weight=1
  run syn_supervised "${syn[@]}" --set loss.kind=supervised
  run k_embedded_point "${kit[@]}" --teacher embedded --set loss.point_weight=1
  run k_pydnet_point "${kit[@]}" --teacher "$pydnet" --set loss.point_weight=1
  run k_oracle_point "${kit[@]}" --teacher oracle --set loss.point_weight=1
  run k_oracle_paper "${kit[@]}" --teacher oracle
  run k_supervised "${kit[@]}" --teacher oracle --set loss.kind=supervised
else
  run d_sup_tiny "${syn[@]}" --set loss.kind=supervised
  run d_sup_small "${syn[@]}" --set loss.kind=supervised --set model.size=small
  run d_point_tiny "${syn[@]}" --set loss.point_weight=1
  run d_point_small "${syn[@]}" --set loss.point_weight=1 --set model.size=small
fi
for p in "${pids[@]}"; do wait "$p"; done
echo "all runs done in $(( $(date +%s) - start )) s"
for name in "${names[@]}"; do
  echo "== $name: $(grep -E '^[0-9]+ steps in' "$out/$name.log")"
  tail -n 1 "$out/$name/table.md" 2>/dev/null || tail -n 5 "$out/$name.log"
done
