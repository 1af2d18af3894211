#!/usr/bin/env bash
# The whole GPU check in one call, inside 9 minutes: CUDA tests, the GPU bench against the peers, the launch
# sweep, SDPA pinned to FlashAttention, three size probes, and the summary.
#
#   bash bench/run_gpu.sh OUTDIR            run it
#   bash bench/run_gpu.sh --dry-run OUTDIR  print what it would run and its time budget, run nothing
#
# For a GPU machine with no network on which torch, triton and pytest-benchmark are already installed: it
# installs nothing from anywhere (an offline editable install of this checkout, or, when that fails, a copy
# of the packages with kernels/ placed where the wheel puts it, tauformer_kernels/kernels). Files in OUTDIR
# (at most 8, what the device tool brings back):
#   env.txt        nvidia-smi, versions, commit, the settings of this run
#   tests.log      the CUDA tests (Triton test files first, in parallel where pytest-xdist is installed)
#   bench.log      pytest bench/ (pytest-benchmark's tables, skip reasons)
#   bench.json     pytest-benchmark's JSON
#   probes.json    bench/gpu_probes.py: the num_stages × warps sweep, SDPA (flash) side by side, the probes
#   <device>.md    the summary table (bench/summarize.py), and <device>.json
#   multigpu.log   with more than one GPU: FSDP2 and context parallel training beside one GPU (losses, bytes)
# Copy <device>.md/.json and probes.json into bench/results/ to commit them.
#
# Knobs (environment): TAUFORMER_DEADLINE_S (total, default 540), TAUFORMER_TESTS_S (test time box,
# default 150), TAUFORMER_BENCH_LENGTHS (default 1024,4096,16384), TAUFORMER_BENCH_HEAD_DIMS (64,128),
# TAUFORMER_BENCH_CONTEXTS (1024,4096,16384,32768), TAUFORMER_PROBE_S (each probe's box, default 40),
# TAUFORMER_MULTI_S (the multi-GPU box: default 90 with more than one GPU, half of it from the tests' default
# box and half from the bench's; 0 with one GPU).
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT=${1:?usage: bash bench/run_gpu.sh [--dry-run] OUTDIR}
cd "$(dirname "$0")/.."
START=$(date +%s)
DEADLINE=${TAUFORMER_DEADLINE_S:-540}
TESTS_S=${TAUFORMER_TESTS_S:-150}
PROBE_S=${TAUFORMER_PROBE_S:-40}
SWEEP_S=40
SDPA_S=50
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET TAUFORMER_GPU_CONFIGS
elapsed() { echo $(( $(date +%s) - START )); }
TRITON_TESTS="tests/kernels/test_attention_triton.py tests/kernels/test_attention_triton_backward.py tests/kernels/test_lambda_triton.py \
tests/kernels/test_lambda_triton_backward.py tests/kernels/test_gpu_sizes.py tests/kernels/test_bad_input.py"
PROBES="big-forward many-heads long-backward"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
MULTI_S=0
if [ "$NGPU" -gt 1 ]; then  # its box comes out of the tests' and the bench's in equal parts
    MULTI_S=${TAUFORMER_MULTI_S:-90}
    TESTS_S=${TAUFORMER_TESTS_S:-$(( 150 - MULTI_S / 2 ))}
fi
# context parallel needs the 128-token windows of the tiny preset cut into 2 chunks per rank
NCP=$NGPU; if [ $(( 128 % (2 * NGPU + (NGPU == 0)) )) -ne 0 ]; then NCP=2; fi
BENCH_S=$(( DEADLINE - TESTS_S - SWEEP_S - SDPA_S - 3 * PROBE_S - MULTI_S - 30 ))
MULTI_TERM=""; [ "$MULTI_S" -gt 0 ] && MULTI_TERM=" + ${MULTI_S}"  # the budget's terms are the boxes that run

if [ "$DRY" = 1 ]; then
    cat <<EOF
plan (total deadline ${DEADLINE} s; the device tool allows 600 s a command):
  0. install: pip install --no-deps --no-build-isolation --no-index -e . (fallback: a copy on PYTHONPATH)
  1. tests, ${TESTS_S} s box: $PY -m pytest -q [-n 8] ${TRITON_TESTS}, then the other test files
  2. bench, ${BENCH_S} s box: $PY -m pytest bench/ --bench-device cuda --bench-budget $(( BENCH_S - 60 ))
       lengths ${TAUFORMER_BENCH_LENGTHS:-1024,4096,16384}, head dims ${TAUFORMER_BENCH_HEAD_DIMS:-64,128},
       contexts ${TAUFORMER_BENCH_CONTEXTS:-1024,4096,16384,32768}
  3. sweep, ${SWEEP_S} s box: $PY bench/gpu_probes.py sweep   (num_stages 1,2,3 x warps 4,8; B4 H16 T4096 D64 bf16)
  4. sdpa, ${SDPA_S} s box: $PY bench/gpu_probes.py sdpa     (SDPA pinned to FLASH_ATTENTION, recorded)
  5. probes, ${PROBE_S} s box each, each in its own process: ${PROBES}
  6. multi-GPU, ${MULTI_S} s box (${NGPU} GPUs seen; 0 s with one): tiny preset, 20 steps each, one GPU beside
       torchrun --nproc_per_node=${NGPU} --fsdp and --nproc_per_node=${NCP} --context-parallel ${NCP} -> OUT/multigpu.log
  7. summary: $PY bench/summarize.py OUT/bench.json --out OUT; probes merged into OUT/probes.json
budget: ${TESTS_S} + ${BENCH_S} + ${SWEEP_S} + ${SDPA_S} + 3 x ${PROBE_S}${MULTI_TERM} + 30 (install, summary) = ${DEADLINE} s
EOF
    exit 0
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)

# --- 0. the package, importable without the network -------------------------------------------------
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/env.txt" 2>&1; then
    echo "editable install failed (see above); using a copy on PYTHONPATH" >>"$OUT/env.txt"
    mkdir -p "$WORK/site"
    cp -r src/tauformer_kernels src/tauformer_model "$WORK/site/"
    cp -r kernels "$WORK/site/tauformer_kernels/kernels"  # where the wheel puts the device code
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# --- environment record -----------------------------------------------------------------------------
{
    echo "== date"; date -u
    echo "== commit"; git rev-parse HEAD 2>/dev/null || echo "${TAUFORMER_COMMIT:-unknown (no .git)}"
    git status --porcelain --untracked-files=no 2>/dev/null | head -20
    echo "== nvidia-smi"; nvidia-smi 2>&1
    echo "== versions"
    "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30, 1), "GiB")
for name in ("triton", "pytest", "pytest_benchmark", "xdist", "tauformer_kernels", "tauformer_kernels.kernels"):
    try:
        m = __import__(name, fromlist=["_"])
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", e)
EOF
} >>"$OUT/env.txt" 2>&1

# --- 1. the CUDA tests, time-boxed: the Triton files first (cold compiles: in parallel) ---------------
PAR=""
"$PY" -c "import xdist" 2>/dev/null && PAR="-n 8"
echo "tests: up to ${TESTS_S} s (${PAR:-serial})"
timeout -s INT -k 15 "$TESTS_S" bash -c "
  $PY -m pytest -q $PAR -p no:cacheprovider -rfEs $TRITON_TESTS;
  echo \"triton test files: exit \$?\";
  $PY -m pytest -q $PAR -p no:cacheprovider -rfEs tests/ $(for f in $TRITON_TESTS; do printf -- '--ignore=%s ' "$f"; done)
" >"$OUT/tests.log" 2>&1
TESTS_RC=$?
echo "tests exit code $TESTS_RC after $(elapsed) s (124: time box reached)" | tee -a "$OUT/tests.log"

# --- 2. the GPU bench (the budget option skips what no longer fits) -----------------------------------
echo "bench: up to ${BENCH_S} s"
timeout -s INT -k 15 "$BENCH_S" "$PY" -m pytest bench/ -q -p no:cacheprovider -rs --bench-device cuda \
    --bench-lengths "${TAUFORMER_BENCH_LENGTHS:-1024,4096,16384}" \
    --bench-head-dims "${TAUFORMER_BENCH_HEAD_DIMS:-64,128}" \
    --bench-contexts "${TAUFORMER_BENCH_CONTEXTS:-1024,4096,16384,32768}" \
    --bench-budget $(( BENCH_S - 60 )) --benchmark-json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
BENCH_RC=$?
echo "bench exit code $BENCH_RC after $(elapsed) s" | tee -a "$OUT/bench.log"

# --- 3-5. sweep, SDPA side by side, the probes: each in its own process ------------------------------
timeout -k 10 "$SWEEP_S" "$PY" bench/gpu_probes.py sweep "$WORK/sweep.json" >>"$OUT/bench.log" 2>&1
timeout -k 10 "$SDPA_S" "$PY" bench/gpu_probes.py sdpa "$WORK/sdpa.json" >>"$OUT/bench.log" 2>&1
for p in $PROBES; do
    timeout -k 10 "$PROBE_S" "$PY" bench/gpu_probes.py "$p" "$WORK/$p.json" >>"$OUT/bench.log" 2>&1 \
        || echo "{\"probe\": \"$p\", \"error\": \"exit $? (124: past its ${PROBE_S} s box)\"}" >"$WORK/$p.json"
done
"$PY" - "$WORK" "$OUT/probes.json" <<'EOF'
import json, os, sys
work, out = sys.argv[1:]
merged = {}
for name in ("sweep", "sdpa", "big-forward", "many-heads", "long-backward"):
    path = os.path.join(work, name + ".json")
    try:
        merged[name] = json.load(open(path))
    except Exception as e:  # noqa: BLE001
        merged[name] = {"error": f"no result ({type(e).__name__})"}
json.dump(merged, open(out, "w"), indent=2)
EOF

# --- 6. more than one GPU: FSDP2 and context parallel beside one GPU (NCCL, bf16 autocast) -------------
# Same windows and seed: FSDP over N GPUs against one GPU with --grad-accum N, context parallel over NCP
# GPUs against one GPU on whole windows; the losses agree to bf16 noise, the log has the bytes each rank sends.
if [ "$NGPU" -gt 1 ]; then
    echo "multi-GPU: up to ${MULTI_S} s (${NGPU} GPUs)"
    TRAIN="-m tauformer_model.train --preset tiny --tokenizer byte --max-steps 20 --eval-every 10 --eval-batches 2 \
--checkpoint-every 20 --batch-size 8 --seed 1 --no-progress"
    RUN="$PY -m torch.distributed.run --standalone"
    timeout -s INT -k 15 "$MULTI_S" bash -c "
      set -x
      $PY $TRAIN --out $WORK/one --grad-accum $NGPU
      $RUN --nproc_per_node=$NGPU $TRAIN --out $WORK/fsdp --fsdp
      $PY $TRAIN --out $WORK/one-window
      $RUN --nproc_per_node=$NCP $TRAIN --out $WORK/cp --context-parallel $NCP
    " >"$OUT/multigpu.log" 2>&1
    echo "multi-GPU exit code $? after $(elapsed) s" | tee -a "$OUT/multigpu.log"
    for run in one fsdp one-window cp; do
        echo "== $run"; cat "$WORK/$run/metrics.jsonl" 2>/dev/null || echo "(no metrics)"
    done >>"$OUT/multigpu.log"
    tail -12 "$OUT/multigpu.log"
fi

# --- 7. the summary ----------------------------------------------------------------------------------
if [ -s "$OUT/bench.json" ]; then
    "$PY" bench/summarize.py "$OUT/bench.json" --out "$OUT" 2>&1 | tee -a "$OUT/bench.log"
    sed -n "/^## Headline/,/^## Skipped/p" "$OUT"/*.md 2>/dev/null | head -80
else
    echo "no bench.json: see $OUT/bench.log"
fi
head -c 3000 "$OUT/probes.json"; echo
tail -3 "$OUT/tests.log"
echo "done in $(elapsed) s: tests rc=$TESTS_RC bench rc=$BENCH_RC; files in $OUT"
