#!/usr/bin/env bash
# On a machine with an NVIDIA GPU, in one go: the CUDA-only tests, the whole test suite, then
# the GPU numbers that docs/benchmarks.md reports (ms per step eager and graphed, fast-gpu to
# 99% against the peer recipe, the guide's epoch graphed against its own DataLoader).
#
#   TORCHMNIST_DATA_DIR=/path/holding/MNIST/raw bash benchmarks/cuda_check.sh [LOG_DIR] [PARTS]
#
# MNIST/raw holds the four files uncompressed, as torchvision's MNIST reads them (the tests
# that compare with the guide's own scripts use it); with .gz files alone those tests skip.
# LOG_DIR (default cuda-check) receives one log per part; PARTS is any of "cuda suite bench"
# (default all three). Every part has a time limit, so a hang costs minutes, not the machine.
# Run it from the repository root, with torchmnist importable (pip install -e . or
# PYTHONPATH=src). The suite runs under pytest-xdist when it is installed, each worker and
# its subprocesses on 2 CPU threads: the guide's OMP_NUM_THREADS advice for many processes on
# one machine, without which the CPU-only tests crowd each other out.
set -u
cd "$(dirname "$0")/.."
: "${TORCHMNIST_DATA_DIR:?set TORCHMNIST_DATA_DIR to the folder holding MNIST/raw}"
logs=${1:-cuda-check}
parts=${2:-cuda suite bench}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

part() { echo; echo "=== $1 ($(date +%T))"; }
has() { [[ " $parts " == *" $1 "* ]]; }

part "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
$py -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name()
        if torch.cuda.is_available() else 'no CUDA device')"

if has cuda; then
    part "CUDA-only tests (tests/test_graphs.py)"
    timeout 120 $py -m pytest -q -rfE -p no:cacheprovider tests/test_graphs.py \
        > "$logs/cuda_tests.log" 2>&1
    tail -n 15 "$logs/cuda_tests.log"
fi

if has suite; then
    part "the whole suite"
    options=()
    if $py -c "import xdist" 2>/dev/null; then
        options+=(-n "$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))")
    fi
    if $py -c "import pytest_timeout" 2>/dev/null; then
        options+=(--timeout 300)  # a test that hangs is failed with its threads' stacks
    fi
    # SIGINT at the limit: pytest still prints what passed and failed.
    # -rfEs: the log ends with each failure, error and reason to skip (packages or data that
    # this machine lacks), so a run elsewhere can be compared test for test.
    OMP_NUM_THREADS=2 timeout -s INT -k 30 420 $py -m pytest -q -rfEs --durations 10 \
        -p no:cacheprovider "${options[@]}" > "$logs/suite.log" 2>&1
    echo "pytest exit code $?"
    grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$logs/suite.log" | tail -n 60
fi

if has bench; then
    bench() { timeout "$1" $py -m torchmnist bench --device cuda "${@:2}" 2>&1; }
    part "ms per step, eager and graphed: fast-gpu"
    bench 60 --recipe fast-gpu --loaders tensor --trials 3 --accuracy-trials 0 \
        | tee "$logs/steps_fast_gpu.log" | tail -n 4
    part "ms per step: guide, tensor loader and the guide's DataLoader (4 workers)"
    bench 90 --recipe guide --loaders tensor,dataloader:4 --trials 2 --accuracy-trials 0 \
        | tee "$logs/steps_guide.log" | tail -n 4
    part "fast-gpu to 99%, seeds 1-10"
    bench 60 --recipe fast-gpu --loaders= --accuracy-trials 10 --target-accuracy 0.99 \
        --eval-interval 15s | tee "$logs/fast_gpu.log" | tail -n 2
    part "the peer recipe (tuomaso/train_mnist_fast), seeds 1-10, in the same run"
    timeout 60 $py benchmarks/peer_fast_mnist.py --device cuda --seeds 10 2>&1 \
        | tee "$logs/peer.log" | tail -n 2
    part "the guide's epoch: graphed tensor loader, then the guide's DataLoader, seeds 1-3"
    bench 40 --recipe guide --epochs 1 --cuda-graph --loaders= --accuracy-trials 3 \
        | tee "$logs/guide_graphed.log" | tail -n 1
    bench 60 --recipe guide --epochs 1 --loader dataloader --num-workers 4 --loaders= \
        --accuracy-trials 3 | tee "$logs/guide_dataloader.log" | tail -n 1
fi
part "done"
