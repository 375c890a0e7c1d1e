#!/usr/bin/env bash
# The GPU check of issue 5, prepared for a lent GPU (about 5 minutes on one H200):
# paper-size pretraining and supervised throughput in bf16 + channels_last, eager and
# compiled, fp32 for reference, MFU against the GPU's own matmul peak, and bf16 against fp32
# losses over a few steps. Run from the repository root after installing the project:
#     bash benchmarks/gpu_check.sh 2>&1 | tee gpu_check.log
set -euo pipefail
B=${B:-256}
python benchmarks/throughput.py --preset paper-cifar10 --device cuda --bf16 --batch-size "$B"
python benchmarks/throughput.py --preset paper-cifar10 --device cuda --batch-size "$B"
python benchmarks/throughput.py --preset paper-cifar10 --device cuda --bf16 --batch-size "$B" --compile
python benchmarks/precision_parity.py --preset paper-cifar10 --device cuda --steps 10 --batch-size "$B"
