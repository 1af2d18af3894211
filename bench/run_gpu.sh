#!/usr/bin/env bash
# The whole GPU check in one call: CUDA tests, then the GPU bench, then the summary, inside ~9.5 minutes.
#
#   bash bench/run_gpu.sh OUTDIR
#
# For a GPU machine with no network on which torch, triton and pytest-benchmark are already installed:
# it installs nothing from anywhere (the package is made importable with an offline editable install of
# this checkout, or PYTHONPATH=src when that fails). Everything lands in OUTDIR (6 files):
#   env.txt        nvidia-smi, versions, commit, the settings of this run
#   tests.log      python -m pytest -q tests/
#   bench.log      pytest bench/ (pytest-benchmark's tables, skip reasons)
#   bench.json     pytest-benchmark's JSON
#   <device>.md    the summary table (bench/summarize.py), and <device>.json
# Copy <device>.md/.json into bench/results/ to commit them.
#
# Knobs (environment): TAUFORMER_DEADLINE_S (total, default 560), TAUFORMER_TESTS_S (test time box,
# default 200), TAUFORMER_BENCH_LENGTHS (default 1024,4096,16384), TAUFORMER_BENCH_HEAD_DIMS (64,128),
# TAUFORMER_BENCH_CONTEXTS (1024,4096,16384,32768); for a dry run of the plumbing on a CPU machine:
# TAUFORMER_BENCH_DEVICE=cpu TAUFORMER_BENCH_EXTRA=--bench-quick TAUFORMER_TESTS_S=30.
set -u
OUT=${1:?usage: bash bench/run_gpu.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
START=$(date +%s)
DEADLINE=${TAUFORMER_DEADLINE_S:-560}
TESTS_S=${TAUFORMER_TESTS_S:-200}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
elapsed() { echo $(( $(date +%s) - START )); }

# --- the package, importable without the network ---------------------------------------------------
if ! "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/env.txt" 2>&1; then
    echo "editable install failed (see above); falling back to PYTHONPATH=src" >>"$OUT/env.txt"
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
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
for name in ("triton", "pytest", "pytest_benchmark", "tauformer_kernels"):
    try:
        m = __import__(name)
        print(name, getattr(m, "__version__", "?"), getattr(m, "__file__", ""))
    except Exception as e:  # noqa: BLE001
        print(name, "NOT IMPORTABLE:", e)
EOF
} >>"$OUT/env.txt" 2>&1

# --- 1. the CUDA tests, time-boxed ------------------------------------------------------------------
echo "tests: up to ${TESTS_S} s"
timeout -s INT -k 15 "$TESTS_S" "$PY" -m pytest -q tests/ -p no:cacheprovider -rfEs >"$OUT/tests.log" 2>&1
TESTS_RC=$?
echo "tests exit code $TESTS_RC after $(elapsed) s (124: time box reached)" | tee -a "$OUT/tests.log"

# --- 2. the GPU bench, in what time is left (the budget option skips what no longer fits) ------------
LEFT=$(( DEADLINE - $(elapsed) - 30 ))
BUDGET=$(( LEFT - 60 ))
[ "$BUDGET" -lt 30 ] && BUDGET=30
echo "bench: up to ${LEFT} s (budget ${BUDGET} s for starting new benchmarks)"
timeout -s INT -k 15 "$LEFT" "$PY" -m pytest bench/ -q -p no:cacheprovider -rs \
    --bench-device "${TAUFORMER_BENCH_DEVICE:-cuda}" ${TAUFORMER_BENCH_EXTRA:-} \
    --bench-lengths "${TAUFORMER_BENCH_LENGTHS:-1024,4096,16384}" \
    --bench-head-dims "${TAUFORMER_BENCH_HEAD_DIMS:-64,128}" \
    --bench-contexts "${TAUFORMER_BENCH_CONTEXTS:-1024,4096,16384,32768}" \
    --bench-budget "$BUDGET" --benchmark-json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
BENCH_RC=$?
echo "bench exit code $BENCH_RC after $(elapsed) s" | tee -a "$OUT/bench.log"

# --- 3. the summary ----------------------------------------------------------------------------------
if [ -s "$OUT/bench.json" ]; then
    "$PY" bench/summarize.py "$OUT/bench.json" --out "$OUT" 2>&1 | tee -a "$OUT/bench.log"
    sed -n "/^## Headline/,/^## Skipped/p" "$OUT"/*.md 2>/dev/null | head -80
else
    echo "no bench.json: see $OUT/bench.log"
fi
tail -3 "$OUT/tests.log"
echo "done in $(elapsed) s: tests rc=$TESTS_RC bench rc=$BENCH_RC; files in $OUT"
