"""GPU-hours for ACL on ImageNet-1K, all data against RCS, projected from measured rates.

Inputs are measurements, not guesses: `--images-per-s` is ACL ResNet-50 training throughput at 224 px on one
GPU (`bench_train.py --archs resnet50 --image-size 224 --device cuda --variants bf16+cl --attack-steps 1`:
images/s of the step, attack included), `--round-s` the wall time of one selection round over the whole pool on one GPU
(`pipeline select` on a 224 px shard set, or a `selection` record of a run), `--loader-images-per-s` what the
loader delivers per GPU (`bench_loader.py --device cuda --crop 224`; training cannot go faster). Schedule as
configs/imagenet-acl.toml: `--epochs` 200, full data for `--warmup` 20, then `--fraction` 0.05 re-selected
every `--every` 10 epochs. Overlapped rounds cost their GPU time only where they run on the training GPUs
(`--overlap-cost 1`, the default) and nothing where a spare GPU takes them (`--overlap-cost 0`).

    python benchmarks/project_imagenet.py --images-per-s R --round-s S [--loader-images-per-s L] [--overlap-cost 0]

Prints one JSON line and a table, next to the authors' 650 GPU-hours (RTX A5000) for full-data ACL.
"""

from __future__ import annotations

import argparse
import json
import math

AUTHORS_FULL_DATA_HOURS = 650.0


def project(n: int, epochs: int, warmup: int, every: int, fraction: float, images_per_s: float, round_s: float,
            loader_images_per_s: float | None, overlap_cost: float) -> dict:
    rate = min(images_per_s, loader_images_per_s) if loader_images_per_s else images_per_s
    full_h = epochs * n / rate / 3600
    rounds = len(range(warmup, epochs, every))
    subset_epochs = epochs - warmup
    rcs_train_h = (warmup * n + subset_epochs * math.ceil(fraction * n)) / rate / 3600
    rcs_select_h = rounds * round_s * overlap_cost / 3600
    return {"n": n, "epochs": epochs, "rate_images_per_s": rate, "loader_bound": bool(loader_images_per_s and
                                                                                     loader_images_per_s < images_per_s),
            "full_data_gpu_h": round(full_h, 1), "rcs_rounds": rounds, "rcs_training_gpu_h": round(rcs_train_h, 1),
            "rcs_selection_gpu_h": round(rcs_select_h, 1), "rcs_total_gpu_h": round(rcs_train_h + rcs_select_h, 1),
            "speedup": round(full_h / (rcs_train_h + rcs_select_h), 2), "authors_full_data_h": AUTHORS_FULL_DATA_HOURS}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images-per-s", type=float, required=True, help="ACL ResNet-50 224 px training, one GPU")
    ap.add_argument("--round-s", type=float, required=True, help="one selection round over the pool, one GPU")
    ap.add_argument("--loader-images-per-s", type=float, default=None, help="loader delivery per GPU")
    ap.add_argument("--n", type=int, default=1_281_167)
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--overlap-cost", type=float, default=1.0, help="1: rounds take training GPUs; 0: a spare GPU")
    args = ap.parse_args(argv)
    r = project(args.n, args.epochs, args.warmup, args.every, args.fraction, args.images_per_s, args.round_s,
                args.loader_images_per_s, args.overlap_cost)
    print(json.dumps({"benchmark": "project_imagenet", **r}))
    print(f"\n{'':28s} {'GPU-hours':>10s}")
    print(f"{'authors, full data (A5000)':28s} {AUTHORS_FULL_DATA_HOURS:>10.0f}")
    print(f"{'projected, full data':28s} {r['full_data_gpu_h']:>10.1f}")
    print(f"{'projected, RCS training':28s} {r['rcs_training_gpu_h']:>10.1f}")
    print(f"{'projected, RCS selection':28s} {r['rcs_selection_gpu_h']:>10.1f}  ({r['rcs_rounds']} rounds)")
    print(f"{'projected, RCS total':28s} {r['rcs_total_gpu_h']:>10.1f}  ({r['speedup']}x less than full data)")


if __name__ == "__main__":
    main()
