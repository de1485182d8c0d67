#!/usr/bin/env bash
# The paper's training protocol (examples/paper_protocol_*.yaml) on one GPU, in bf16-mixed: the
# paired grid of softmax, AS-Softmax, AS-Speed, AS-Softmax + DeltaWarmup, AS-Softmax +
# SkipMaskedSamples and label smoothing 0.1 on CLINC150 then Banking77, 3 seeds, seed block by
# seed block, stopping before the time budget (8 minutes by default, BUDGET_S) and continuing from
# benchmarks/results/paper_protocol/*.journal.jsonl. Writes under $OUT (default runs/paper_protocol):
# <set>.journal.jsonl and timing.json (copy them over the committed ones in
# benchmarks/results/paper_protocol/ and commit: the next run continues from them), <set>.summary.md,
# <set>.compare.png and run.log. The logic is in gpu_paper_protocol.py.
#
# Before: `make gpu-payload` here writes .gpu_payload/ (MiniLM in bf16, the two sets' TSV files,
# the wheels the GPU machine lacks); copy it there with the working tree (it is ignored by git,
# about 47 MiB). On the GPU machine, from the repository root (allow BUDGET_S plus a minute):
#   bash benchmarks/gpu_paper_protocol.sh
# Here, on the CPU, the same steps with a few batches per fit:
#   bash benchmarks/gpu_paper_protocol.sh --dry-run
# Further options go to gpu_paper_protocol.py (--seeds, --sets, --parallel, --budget, ...).
set -euo pipefail
STARTED_AT=$(date +%s)
cd "$(dirname "$0")/.."
PAYLOAD=${PAYLOAD:-.gpu_payload}
BUDGET_S=${BUDGET_S:-480}
PYTHON=${PYTHON:-python3}

if [ ! -f "$PAYLOAD/minilm/model.safetensors" ]; then
    echo "no $PAYLOAD/minilm: run \`make gpu-payload\` where the packages are installed, and copy $PAYLOAD here" >&2
    exit 2
fi
# LightningCLI needs jsonargparse: install the carried wheels where it is missing.
if ! "$PYTHON" -c "import jsonargparse, docstring_parser, typeshed_client" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/paper_protocol_site "$PAYLOAD"/wheels/*.whl
    export PYTHONPATH=/tmp/paper_protocol_site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [[ " $* " != *" --dry-run "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
exec "$PYTHON" benchmarks/gpu_paper_protocol.py --started-at "$STARTED_AT" --budget "$BUDGET_S" \
    --payload "$PAYLOAD" --python "$PYTHON" "$@"
