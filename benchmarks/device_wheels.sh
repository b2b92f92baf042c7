#!/usr/bin/env bash
# Wheels of what the lent GPU machines' image lacks (it has PyTorch, torchvision, numpy, scipy, scikit-learn,
# numba, typer, rich; no package registry), for its Python 3.12 on x86-64, into .whl/ (git-ignored), for
# benchmarks/gpu_suite.sh to install there. About 19 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    "simplejpeg>=1.7" webdataset==1.0.2 braceexpand "faiss-cpu>=1.8" "tomli-w>=1.0"
ls -la .whl
