#!/usr/bin/env bash
# Reproduces bench/results on a CUDA machine where gacc_kernels is installed (pip install
# --no-build-isolation -e .): the GPU test run, the kernel, hook-path and end-to-end benchmarks,
# the frameworks' fine-tuning runs and the demo, each stamped with device, versions and date.
#   bash bench/run.sh [OUT_DIR]     (default: bench/results/<today>)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$(mkdir -p "${1:-$root/bench/results/$(date +%F)}" && cd "${1:-$root/bench/results/$(date +%F)}" && pwd)
export PYTHONUNBUFFERED=1
cd "$root"
(nvidia-smi --query-gpu=name,driver_version --format=csv && python3 -m gacc_kernels) > "$out/backends.txt"
python3 -m pytest -q -p no:cacheprovider > "$out/tests_gpu.txt" 2>&1 || { tail -n 30 "$out/tests_gpu.txt"; exit 1; }
cd "$root/bench"
python3 bench_kernels.py --out "$out"
python3 bench_hooks.py --out "$out" --bucket-sweep
python3 bench_e2e.py --out "$out"
python3 bench_frameworks.py --out "$out"  # HF Trainer, Accelerate, Lightning: stock vs gacc vs fp32
# torchrun --nproc-per-node=2 bench_dist.py --out "$out"  # several GPUs: DDP, FSDP2 vs gacc (N=1: a dry run)
python3 demo.py > "$out/demo.txt"
python3 plot_results.py "$out"  # hooks.png and e2e.png from the tables (needs matplotlib)
echo "results in $out"
