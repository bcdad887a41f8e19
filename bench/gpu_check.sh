#!/usr/bin/env bash
# The GPU figures in the README: loader and training throughput on a CUDA machine without Ray.
# Runs where the project's own dependencies are not installed: wheels for smp, albumentations and
# pycocotools come from .whl/ (pip download ... --python-version of that machine), and the sample
# dataset is generated there at 480x360.  Results land in $OUT (or ./gpu-check).
set -euo pipefail
OUT=${OUT:-gpu-check}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 SEGSEARCH_CACHE=/tmp/segsearch-cache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, timm, segmentation_models_pytorch as smp; print('torch', torch.__version__, 'timm', timm.__version__, 'smp', smp.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "from data_pipeline.sample_data import generate_sample_dataset as g; g('/tmp/sample', n_train=480, n_val=40, n_test=8, width=480, height=360, seed=0)"
for workers in 2 8; do
  timeout 300 python3 bench/loader.py --data /tmp/sample --resize 256 --policy flip --batch-size 16 \
    --workers "$workers" --epochs 3 2>&1 | tee "$OUT/loader_w$workers.txt"
done
for policy in flip strong; do
  timeout 300 python3 bench/train_throughput.py --data /tmp/sample --resize 256 --policy "$policy" \
    --batch-size 16 --workers 0 3 7 --steps 60 2>&1 | tee "$OUT/train_$policy.txt"
done
