#!/usr/bin/env bash
# The GPU check of the training step, as one prepared run of under 10 minutes on one H100/H200 (bench/RESULTS.md,
# "GPU step benchmark"). The lent GPU machines have torch + CUDA but another transformers and no network, so the
# pinned transformers travels as wheels in bench/wheels/ (gitignored; fill it on a machine with network):
#   pip download --no-deps -d bench/wheels transformers==5.24.0 huggingface_hub==2.4.0
# Results land in $OUT (or bench/gpu_out): the printed tables, and one JSON per run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/gpu_out}"
mkdir -p "$OUT"
if compgen -G "bench/wheels/*.whl" > /dev/null; then
  pip install -q --no-deps --target "$OUT/site" bench/wheels/*.whl
  export PYTHONPATH="$PWD/$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/card.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/card.txt"
# every variant with the switches off and on, then run_trainer.py end to end with them on (~6 min on an H100)
timeout 420 python bench/bench_gpu_step.py --sets plain,fast,fast_nocompile --steps 8 --trainer_steps 30 \
  --json "$OUT/llama_1p3b.json" 2>&1 | tee "$OUT/llama_1p3b.txt"
# the memory target: GPT-J-style 1.3B at batch 8 under 40 GiB (~2 min)
timeout 150 python bench/bench_gpu_step.py --arch gptj --batch 8 --sets fast --variants shared --steps 4 \
  --trainer_sets "" --json "$OUT/gptj_1p3b_b8.json" 2>&1 | tee "$OUT/gptj_1p3b_b8.txt"
