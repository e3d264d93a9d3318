#!/usr/bin/env bash
# Makes every table and plot that the README's benchmark section cites, on a CUDA machine where
# gacc_kernels is installed (pip install --no-build-isolation -e .), into one folder: the GPU test run,
# kernels, hook path, fused Linear weight grads, end to end (each config the README quotes), host time per
# micro-step and per layer, the frameworks' fine-tuning runs, data parallel (one GPU: a dry run) and the
# demo. Each file is stamped with device, versions and date; backends.txt also has the commit. About half
# an hour on one H100, most of it the end-to-end runs.
#   bash bench/run.sh [OUT_DIR]     (default: bench/results/<device>-<date>, e.g. h100-2026-11-24)
# The comparisons with an earlier library in bench/results (hooks_before.md, armed/before/) ran by hand
# on the commits that bench/results/INDEX.md names; this script measures the tree it runs on.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)  # e.g. NVIDIA H100 80GB HBM3
device=$(tr ' ' '\n' <<< "$gpu" | grep -m 1 '[0-9]' | tr 'A-Z' 'a-z' | tr -c 'a-z0-9\n' '-' || true)  # h100
out=${1:-$root/bench/results/${device:-gpu}-$(date +%F)}
mkdir -p "$out"
out=$(cd "$out" && pwd)
gpus=$(nvidia-smi -L | wc -l)
export PYTHONUNBUFFERED=1
cd "$root"
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || [ "$commit" = unknown ] || commit="$commit, with uncommitted changes"
{
  echo "commit $commit"
  date -u
  nvidia-smi --query-gpu=name,driver_version --format=csv
  python3 -m gacc_kernels
} > "$out/backends.txt"
python3 -m pytest -q -p no:cacheprovider > "$out/tests_gpu.txt" 2>&1 || { tail -n 30 "$out/tests_gpu.txt"; exit 1; }
cd "$root/bench"
python3 bench_kernels.py --out "$out"                 # kernels.md, kernels.png
python3 bench_hooks.py --out "$out" --bucket-sweep    # hooks.md
python3 bench_wgrad.py --out "$out"                   # wgrad.md: 1024, 2048 and 8192 tokens per micro-step
# End to end, e2e_k<K>_<micro>x<seq>.md: fused against stock alone, many rounds, to narrow the interval ...
python3 bench_e2e.py --out "$out" --k 8 --rounds 250 --variants gacc-fused,a-bf16
mv "$out/e2e_k8_1x2048.md" "$out/e2e_k8_1x2048_250rounds.md"
python3 bench_e2e.py --out "$out" --k 32 --rounds 60 --variants gacc-fused,a-bf16
mv "$out/e2e_k32_1x2048.md" "$out/e2e_k32_1x2048_60rounds.md"
# ... the hook path, fused and stock at 1 x 2048 (host-bound), and every variant at 8 x 1024 (GPU-bound)
python3 bench_e2e.py --out "$out" --k 8 --rounds 30 --variants gacc,gacc-fused,a-bf16
python3 bench_e2e.py --out "$out" --k 32 --rounds 12 --variants gacc,gacc-fused,a-bf16
python3 bench_e2e.py --out "$out" --k 8 --micro 8 --seq 1024 --rounds 10
python3 bench_backward_host.py --out "$out"           # backward_host.md: the modes alternating micro-step by micro-step
python3 analysis/timeline.py > "$out/timeline.txt"    # host and GPU time of each micro-step of a K=8 window
python3 analysis/hostcost.py > "$out/hostcost.txt"    # host time per Linear layer: stock, hook path, fused
python3 bench_frameworks.py --out "$out"              # HF Trainer, Accelerate, Lightning: stock vs gacc vs fp32
python3 -m torch.distributed.run --nproc-per-node="$gpus" bench_dist.py --out "$out"  # DDP, FSDP2 vs gacc
python3 demo.py > "$out/demo.txt"
python3 plot_results.py "$out" || echo "no hooks.png, e2e*.png: plot_results.py needs matplotlib"
echo "results in $out"
