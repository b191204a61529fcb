#!/usr/bin/env bash
# One prepared GPU check (< 4 minutes on one H100/H200). Run from the repo root on a
# CUDA machine with torch + torchvision (no faiss or onnxruntime needed):
#
#     bash bench/gpu_check.sh            # or: N_IMAGES=2000 WORKERS=4,8,12 bash bench/gpu_check.sh
#
# It synthesises ~2000 JPEGs of 500x375 under /tmp (no dataset is copied), then runs
# bench/extract.py with ResNet-50 *random* weights (no download; speed is the same),
# bf16 autocast at batch 256 (the Embedder's CUDA path), and prints, for each decode
# worker count: model-only img/s, end-to-end img/s (decode -> preprocess -> model ->
# shard write) and their ratio; plus GPU JPEG decode (torchvision.io.decode_jpeg on
# the device) end to end. A compact table comes last.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
N_IMAGES="${N_IMAGES:-2000}"
WORKERS="${WORKERS:-4,8,14}"
BATCH="${BATCH:-256}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python - <<'EOF'
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "numpy", "PIL", "filelock") if importlib.util.find_spec(m) is None]
if missing:  # the pipeline's store writer needs filelock; nothing else beyond torch/numpy/Pillow
    sys.exit(f"missing Python packages: {', '.join(missing)} (pip install them, or carry their wheels)")
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}")
assert torch.cuda.is_available(), "no CUDA device visible"
EOF
# 2000 images x ~6 model-only batches of 256 + one pipeline pass per worker count.
timeout 220 python bench/extract.py --synthesize "$N_IMAGES" --model resnet50 --random-weights \
    --runtime torch --device cuda --batch-size "$BATCH" --workers "$WORKERS" --repeat 1 --gpu-decode \
    --threads "$(nproc)" 2>&1 | tee /tmp/cbir_gpu_check.txt
echo "(full output also in /tmp/cbir_gpu_check.txt)"
