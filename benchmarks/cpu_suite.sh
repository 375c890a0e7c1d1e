#!/usr/bin/env bash
# The CPU figures of the README's Performance section, one after another (about 3 minutes idle).
set -x
python benchmarks/throughput.py --preset cifar10-cpu
python benchmarks/throughput.py --preset cifar10-cpu --bf16
python benchmarks/throughput.py --preset paper-cifar10 --batch-size 64 --reps 4
python benchmarks/throughput.py --preset paper-cifar10 --batch-size 64 --reps 4 --bf16 --profile 15
python benchmarks/stream_loader.py
