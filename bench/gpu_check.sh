#!/usr/bin/env bash
# One prepared GPU check (~1-2 minutes on one H100/H200, limit 3). Run from the repo
# root on a CUDA machine with torch + torchvision (no faiss or onnxruntime needed):
#
#     bash bench/gpu_check.sh            # or: N_IMAGES=2000 WORKERS=4,8,14 DECODE=gpu bash bench/gpu_check.sh
#
# It synthesises N_IMAGES (6000) JPEGs of 500x375 under /tmp, one process per core
# (~25 s per 1,000 on one core: ~10 s on 16; no dataset is copied), then runs
# bench/extract.py with ResNet-50 *random* weights (no download; speed is the same),
# bf16 autocast at batch 256 (the Embedder's CUDA path), and prints, for each decode
# path (cpu: Pillow in the workers; gpu: workers read bytes, nvJPEG decode + resize
# on the GPU, i.e. `--decode gpu`) and decode worker count: model-only img/s,
# end-to-end img/s (read -> decode -> preprocess -> model -> shard write) and their
# ratio; plus the bare GPU decode_jpeg prototype (no store) for reference. The
# compact table comes last.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
N_IMAGES="${N_IMAGES:-6000}"
WORKERS="${WORKERS:-4,14}"
DECODE="${DECODE:-cpu,gpu}"
BATCH="${BATCH:-256}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "numpy", "PIL", "filelock") if importlib.util.find_spec(m) is None]
if missing:  # the pipeline's store writer needs filelock; nothing else beyond torch/numpy/Pillow
    sys.exit(f"missing Python packages: {', '.join(missing)} (pip install them, or carry their wheels)")
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}")
assert torch.cuda.is_available(), "no CUDA device visible"
PY
echo "(full output also in /tmp/cbir_gpu_check.txt)"
# 6000 images: per row ~0.5 s model-only + one pipeline pass (cpu decode ~1k img/s,
# gpu decode several k img/s), 4 rows, plus the prototype pass and synthesis.
timeout 180 python bench/extract.py --synthesize "$N_IMAGES" --model resnet50 --random-weights \
    --runtime torch --device cuda --batch-size "$BATCH" --decode "$DECODE" --workers "$WORKERS" --repeat 1 \
    --gpu-decode --threads "$(nproc)" 2>&1 | tee /tmp/cbir_gpu_check.txt
