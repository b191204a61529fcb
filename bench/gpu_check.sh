#!/usr/bin/env bash
# One prepared GPU check: the whole extraction table in ~1-2 minutes on one
# H100/H200 (hard limit 170 s). Run from the repo root on a CUDA machine with
# torch + torchvision + numpy + Pillow + filelock (no faiss or onnxruntime needed):
#
#     bash bench/gpu_check.sh
#     N_IMAGES=20000 WORKERS=8,15 bash bench/gpu_check.sh     # longer, steadier
#     DATA=/path/to/jpegs bash bench/gpu_check.sh             # real photos instead of synthetic ones
#
# It synthesises N_IMAGES (8000) JPEGs of 500x375 under /tmp, one process per core
# (no dataset is copied), then runs bench/extract.py with ResNet-50 *random*
# weights (no download; speed is the same), bf16 autocast, batch 256, and the
# centre-crop GAP descriptor (bench/extract.py --descriptor legacy, its default: the
# only input the GPU decoder serves; the default full-image two-scale descriptor is
# decoded on the CPU even on CUDA), and prints:
#   - model only img/s (pre-made uint8 batches on the GPU),
#   - the product, `sync_folder` end to end (list + hash files, read, decode,
#     resize/crop, model, shard writes), with --decode gpu (workers read bytes and
#     check headers, nvJPEG decode + batched resize in the main process, model in
#     its own thread), --decode nvimgcodec (the same with nvImageCodec's batch
#     decoder; where it is installed) and --decode cpu (Pillow in the workers),
#     per WORKERS count,
#   - bare batched decode_jpeg (and nvImageCodec) on in-memory bytes, and the
#     in-memory loops decode -> resize (per image / batched) -> model,
#   - a profile of one pass per device decoder: main-thread wall seconds per stage
#     and torch.profiler's top operators by GPU and by CPU time.
# The compact table comes last. Full output also in /tmp/cbir_gpu_check.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
N_IMAGES="${N_IMAGES:-8000}"
WORKERS="${WORKERS:-$(( $(nproc) > 2 ? $(nproc) - 1 : 1 ))}"
BATCH="${BATCH:-256}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
# nvImageCodec (--decode nvimgcodec, the optional extra) on a machine without an
# index: wheels carried in WHEELS (default .devcarry/wheels: nvidia-nvimgcodec-cu13
# and nvidia-nvjpeg, `pip download --no-deps` them beforehand) are installed offline.
WHEELS="${WHEELS:-.devcarry/wheels}"
if ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('nvidia') is None or u.find_spec('nvidia.nvimgcodec') is None)" 2>/dev/null \
        && compgen -G "$WHEELS/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || echo "note: carried wheels not installed"
fi
if python -c "import nvidia.nvimgcodec" 2>/dev/null; then DEFAULT_DECODE=gpu,nvimgcodec,cpu; else DEFAULT_DECODE=gpu,cpu; fi
DECODE="${DECODE:-$DEFAULT_DECODE}"
python - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "numpy", "PIL", "filelock") if importlib.util.find_spec(m) is None]
if missing:  # the pipeline's store writer needs filelock; nothing else beyond torch/numpy/Pillow
    sys.exit(f"missing Python packages: {', '.join(missing)} (pip install them, or carry their wheels)")
import torch, torchvision
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, cuda {torch.cuda.is_available()}")
assert torch.cuda.is_available(), "no CUDA device visible"
PY
if [ -n "${DATA:-}" ]; then SOURCE=(--data "$DATA" --limit 0); else SOURCE=(--synthesize "$N_IMAGES"); fi
status=0
timeout 170 python bench/extract.py "${SOURCE[@]}" --model resnet50 --random-weights \
    --runtime torch --device cuda --batch-size "$BATCH" --decode "$DECODE" --workers "$WORKERS" --repeat 1 \
    --gpu-decode --profile --threads "$(nproc)" 2>&1 | tee /tmp/cbir_gpu_check.txt || status=$?
# Where a runner collects files from $OUT: the full output, also after a timeout.
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then cp /tmp/cbir_gpu_check.txt "$OUT/"; fi
exit "$status"
