#!/usr/bin/env bash
# The GPU check of issue 4, as one command on a lent GPU machine (see BENCHMARKS.md):
# wheels for what the image lacks are carried in .whl, MiniLM's tokenizer files in .gpu/tokenizer.
#   RUNS=whole,split-zero2:1,...          which rungs of bench/gpu_split.py's ladder to run (NAME:M = M micro-batches)
#   SPLIT_TIMEOUT=200                     seconds per hierfed job (the 4-process split runs)
#   TOTAL_TIMEOUT=560                     seconds for the whole ladder
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HIERFED_MPIEXEC=/usr/bin/mpiexec HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, deepspeed, mpi4py; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1
mkdir -p "$OUT/gpu"
timeout "${TOTAL_TIMEOUT:-560}" python3 bench/gpu_split.py --out "$OUT/gpu" --steps 10 --timeout "${SPLIT_TIMEOUT:-200}" --runs "${RUNS:-whole,whole-micro:4,inproc-split:1,split-zero2:1,split-plain:1,split-zero2:4,split-zero3:1}" 2>&1 | grep -v Warning | tail -30
for log in "$OUT"/gpu/split-*.log; do
    [ -f "$log" ] && { echo "== $log"; grep -v Warning "$log" | tail -8; }
done
