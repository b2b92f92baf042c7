#!/usr/bin/env bash
# The GPU figures of issue 13, in three parts that each fit one 10-minute call of a lent GPU machine.
#
#   benchmarks/device_wheels.sh              # here, once: the packages the GPU image lacks, into .whl/
#   benchmarks/gpu_suite.sh train|data|select [OUT]   # there: each part writes its logs into OUT ($OUT)
#
# The GPU image has its own PyTorch (not the pinned one), so the package is not installed there: the repository
# root goes on PYTHONPATH and the carried wheels (simplejpeg, webdataset, faiss-cpu, tomli-w) into /tmp/site.
#   train   ACL step images/s: ResNet-18 at 32 px fp32 vs bf16 + channels_last (+ compile), ResNet-50 at 224
#   data    ImageNet-like JPEGs -> 256 px shards; loader to the GPU at 224 (CPU decode vs nvJPEG) against the
#           per-file PIL loader; a short ACL + RCS run at 224 on them (training rate, round time, stall)
#   select  k-NN of 1.28M x 128 (torch on the GPU, faiss IVF on the CPUs), facility location end to end
# Then benchmarks/project_imagenet.py turns the figures into GPU-hours next to the authors' 650.
set -uo pipefail
part=${1:?usage: gpu_suite.sh train|data|select [OUT]}
out=${2:-${OUT:-benchmarks/gpu-out}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu CLASSES=4 PER_CLASS=16 ACL_SET="--set model.arch=resnet18": a dry run on a CPU
CLASSES=${CLASSES:-100}; PER_CLASS=${PER_CLASS:-50}; ACL_SET=${ACL_SET:-}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
run() {  # name, command...: its output into OUT/name.log and on the screen; carry on after a failure
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
}

case $part in
train)
    run env sh -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c \
'import torch, sys; print(sys.version); print(torch.__version__, torch.cuda.get_device_name())
from pipeline.shards.device_decode import torchvision_decoder
print(\"nvJPEG decoder:\", torchvision_decoder(\"cuda\") is not None)'"
    run train-resnet18 $PY benchmarks/bench_train.py --device $DEVICE --archs resnet18 --batch-size 512 --steps 5 \
        --variants fp32,bf16+cl,bf16+cl+compile
    run train-resnet50 $PY benchmarks/bench_train.py --device $DEVICE --archs resnet50 --image-size 224 \
        --batch-size 128 --steps 5 --attack-steps 1 --variants fp32,bf16+cl
    ;;
data)
    inet=/tmp/inet-$CLASSES-$PER_CLASS
    [ -d $inet/train ] || run make-data $PY benchmarks/make_imagenet_like.py $inet --classes $CLASSES \
        --train-per-class $PER_CLASS --val-per-class 0 --workers 16
    run loader $PY benchmarks/bench_loader.py --data $inet --image-size 256 --crop 224 --subsets 0.05 --epochs 1 \
        --batch-size 256 --workers 12 --no-ffcv --device $DEVICE --work /tmp/bench-inet
    # ACL + RCS at 224 on the same shards, the ImageNet configuration on a short schedule: a round every epoch
    run acl-rcs $PY -m pipeline train --config configs/imagenet-acl.toml --overwrite --out /tmp/acl-rcs \
        --set data.path=/tmp/bench-inet/$(basename $inet)-train --set run.device=$DEVICE --set optim.epochs=4 \
        --set optim.warmup_epochs=1 --set select.warmup=1 --set select.every=1 --set data.batch_size=128 $ACL_SET
    run acl-rcs-records $PY -c "import json
for line in open('/tmp/acl-rcs/metrics.jsonl'):
    if json.loads(line).get('kind') in ('epoch', 'selection'): print(line.strip())"
    ;;
select)
    run knn-100k $PY benchmarks/bench_select_scale.py --mode knn --device $DEVICE --sizes 100000 \
        --backends faiss-flat,faiss-ivf,torch
    run knn-1.28M $PY benchmarks/bench_select_scale.py --mode knn --device $DEVICE --sizes 1281167 \
        --backends faiss-ivf,torch
    run facility $PY benchmarks/bench_select_scale.py --mode facility --device $DEVICE --n 1281167 --sample 100000 \
        --partitions 8
    ;;
*)
    echo "unknown part $part: train, data or select"; exit 2 ;;
esac
