"""Cost of one ACL step (PGD-5 on the contrastive loss + one update) against its floor.

The floor is the same forward/backward passes on tensors of the same shapes, timed alone: 5 attack passes
(eval mode, gradient w.r.t. the input only) and the training pass (natural and adversarial branch, backward).
The step is the trainer's own `training_step` + backward + optimiser step, on a batch already in memory
(augmentation, attack bookkeeping, losses, schedule included; loading is measured by bench_loader.py).

    python benchmarks/bench_train.py [--archs smallcnn,resnet18] [--batch-size 64] [--steps 3] [--device cpu]

Target (issue 3): step time at most 1.15x the floor.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.shards.prepare import PrepareOptions, prepare
from pipeline.trainers import TrainConfig, create_trainer


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_pass(model, views, attack_steps, device, autocast_dtype):
    """The bare passes of one ACL step: attack passes (input gradient only), then the training pass."""
    nat, adv = model.branch("natural"), model.branch("adversarial")
    model.eval()
    x = views.clone()
    for _ in range(attack_steps):
        x.requires_grad_(True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x, adv)["proj"]
        (g,) = torch.autograd.grad(out.float().sum(), x)
        x = (x.detach() + 1e-3 * g.sign()).clamp(0, 1)
    model.train()
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(views, nat)["proj"].float().sum() + model(x, adv)["proj"].float().sum()
    loss.backward()
    model.zero_grad(set_to_none=True)


def pipeline_step(trainer, batch) -> float:
    from pipeline.losses import weighted_mean

    record = trainer.training_step(batch, 0)
    loss = weighted_mean(record.losses, batch.weights)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    return record.logs["attack_s"]


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(trainer, batch, views, attack_steps, repeats):
    """Alternate step and floor measurements and take medians: drift of a shared machine hits both alike."""
    dev = trainer.device
    pipeline_step(trainer, batch)  # warm-up (allocator, autotuning)
    floor_pass(trainer.model, views, attack_steps, dev, trainer.autocast)
    steps, floors, attacks = [], [], []
    for _ in range(repeats):
        box = {}
        steps.append(timed(lambda: box.setdefault("attack", pipeline_step(trainer, batch)), dev))
        attacks.append(box["attack"])
        floors.append(timed(lambda: floor_pass(trainer.model, views, attack_steps, dev, trainer.autocast), dev))
    med = statistics.median
    return med(steps), med(attacks), med(floors)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="smallcnn,resnet18")
    ap.add_argument("--batch-size", type=int, default=64, help="Images per step (2x as many views)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="Timed steps (and floors), alternating; medians reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last memory format (CUDA)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    prepare(f"synthetic:{max(4 * args.batch_size, 256)}", PrepareOptions(out=work / "data", image_size=args.image_size,
                                                                        test_fraction=0.0, progress=False))
    rows = []
    for arch in args.archs.split(","):
        cfg = TrainConfig()
        for k, v in {"data.path": str(work / "data"), "run.out": str(work / arch), "model.arch": arch,
                     "data.batch_size": args.batch_size, "data.workers": 0, "run.device": args.device,
                     "run.bf16": args.bf16, "run.channels_last": args.channels_last, "optim.epochs": 10}.items():
            cfg.set(k, v)
        trainer = create_trainer(cfg, progress=False)
        loader = trainer._loader_for(0)
        batch = next(iter(loader))
        views = torch.rand(2 * len(batch.ids), trainer.channels, args.image_size, args.image_size,
                           device=trainer.device).contiguous(memory_format=trainer.memory_format)
        step_s, attack_s, floor_s = measure(trainer, batch, views, cfg.attack.steps, args.steps)
        images = len(batch.ids)
        rows.append({"arch": arch, "batch": images, "step_s": round(step_s, 4), "attack_s": round(attack_s, 4),
                     "update_s": round(step_s - attack_s, 4), "floor_s": round(floor_s, 4),
                     "images_per_s": round(images / step_s, 1), "floor_images_per_s": round(images / floor_s, 1),
                     "ratio_to_floor": round(step_s / floor_s, 3)})
    result = {"benchmark": "train_step", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
              "device": str(trainer.device), "threads": torch.get_num_threads(), "image_size": args.image_size,
              "bf16": args.bf16, "channels_last": args.channels_last, "rows": rows}
    print(json.dumps(result))
    print(f"\nACL step (PGD-5 + update), {args.image_size}px, device {trainer.device}")
    print(f"{'arch':10s} {'batch':>6s} {'images/s':>10s} {'attack s':>9s} {'update s':>9s} {'floor s':>8s} {'x floor':>8s}")
    for r in rows:
        print(f"{r['arch']:10s} {r['batch']:>6d} {r['images_per_s']:>10.1f} {r['attack_s']:>9.3f} {r['update_s']:>9.3f} "
              f"{r['floor_s']:>8.3f} {r['ratio_to_floor']:>8.3f}")


if __name__ == "__main__":
    main()
