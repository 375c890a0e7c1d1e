#!/usr/bin/env bash
# The CPU figures of the README's Performance section, one after another (about 3 minutes idle
# on a CPU with native bf16). The bf16 rows run only where bf16 is native: where it is emulated
# (no avx512_bf16 / amx_bf16, or ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA capped below them)
# they would take many times longer than fp32 and measure the emulation.
set -x
python benchmarks/throughput.py --preset cifar10-cpu
python benchmarks/throughput.py --preset paper-cifar10 --batch-size 64 --reps 4
emulated=$(python -c "from selfie.device import cpu_bf16_emulated; print(cpu_bf16_emulated() or '')")
if [ -z "$emulated" ]; then
    python benchmarks/throughput.py --preset cifar10-cpu --bf16
    python benchmarks/throughput.py --preset paper-cifar10 --batch-size 64 --reps 4 --bf16 --profile 15
else
    echo "bf16 rows skipped: bf16 is emulated here ($emulated)"
fi
python benchmarks/stream_loader.py
