#!/usr/bin/env bash
# Issue 9, "learning works", over several device calls: the weak tiny run (the objective's match
# terms plus the refinement on the teacher's shape) and its fully-supervised sibling, both on
# sweep 5's setup (studies/study_fresh.sh: views 12 frames apart, batch 32, the 48 held-out
# windows), warm-up + cosine to MAX_STEPS, EMA 0.999. Each call trains MINUTES and leaves both
# final snapshots under $OUT as PART-sized parts (15M: the device returns files of at most
# 16 MiB), so that the next call resumes them:
#
#   here, after a call (n: the KEEP runs):  for n in weak sup; do mkdir -p .devdata/resume/$n
#                          cat FILES_AT/snap_${n}_* | tar xf - -C .devdata/resume/$n; done
#   next call (carry .devdata/datasets and the two snapshot folders, not all of .devdata: the
#   carry limit is 64 MiB):  RESUME_W=.devdata/resume/weak/step-NNN \
#                          RESUME_S=.devdata/resume/sup/step-MMM FIRST=60000 bash studies/study_long.sh
#
#   env: MINUTES (6.5), LIMIT (seconds for the runs, 520), MAX_STEPS (8000), FIRST (the producer's
#        first scene index: past the scenes earlier calls used), RESUME_W / RESUME_S, WEAK_SET
#        (more flags for the weak run, e.g. "--set loss.refine.shifts=true"), VARIANTS (more weak
#        runs beside it, "NAME|FLAGS;NAME|FLAGS", each the weak run plus FLAGS, resumed from
#        RESUME_W too), KEEP (the runs whose snapshots come back, "weak sup": the device returns at
#        most 64 MiB and 8 files, a snapshot is 21 MiB in 2 parts), SUP (0: no supervised run),
#        WORKERS (producer processes, 12), PART (15M), WORK (scratch folder, /tmp/study_long).
# Run from the repository root.
# A run that has reached MAX_STEPS stops at once (studies.study honours max_steps across resumes).
set -u
out=${OUT:?set OUT to the folder that comes back}
work=${WORK:-/tmp/study_long}
export NCCL_NVLS_ENABLE=0
common="--set schedule=cosine --set max_steps=${MAX_STEPS:-8000} --set ema_decay=0.999"
weak="$common --set loss.point_weight=1 --set loss.refine.weight=1 --set loss.refine.depth=teacher ${WEAK_SET:-}"
sup="$common --set loss.kind=supervised"
[ -n "${RESUME_W:-}" ] && weak="$weak --resume $RESUME_W"
[ -n "${RESUME_S:-}" ] && sup="$sup --resume $RESUME_S"
runs=("weak|$weak")
[ "${SUP:-1}" = 1 ] && runs+=("sup|$sup")
IFS=';' read -ra variants <<< "${VARIANTS:-}"
for v in "${variants[@]}"; do runs+=("${v%%|*}|$weak ${v#*|}"); done
STRIDE=12 HELD="synthetic:scenes=48,frames=40,seed=1000,hop=4" BATCH=32 MINUTES=${MINUTES:-6.5} WORKERS=${WORKERS:-12} \
  FIRST=${FIRST:-0} timeout "${LIMIT:-520}" bash studies/study_fresh.sh "$work" "${runs[@]}" \
  > "$out/study.log" 2>&1
for n in ${KEEP:-weak sup}; do
  snap=$(ls -d "$work/$n"/snapshots/step-* 2>/dev/null | tail -n 1)
  [ -n "$snap" ] || { echo "no snapshot for $n"; continue; }
  tar cf "$work-$n.tar" -C "$(dirname "$snap")" "$(basename "$snap")" && split -b "${PART:-15M}" -d "$work-$n.tar" "$out/snap_${n}_"
done
rm -rf "$work/windows" "$work"/*/snapshots
tar czf "$out/logs.tgz" -C "$work" .
tail -n 12 "$out/study.log"
