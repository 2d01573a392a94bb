#!/usr/bin/env bash
# The main job: set-up (venv, pinned deps, editable install), then fusedres-bench; extra args go to it.
# With a CUDA GPU it times kernels, blocks and whole ResNets (results under benchmarks/results/); without one it
# checks the fused ResNet against stock through the Triton interpreter and says which levels need a GPU.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m fusedres.bench "$@"
