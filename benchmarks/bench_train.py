"""Cost of one training step of each method against its floor.

The floor is the same forward/backward passes on tensors of the same shapes, timed alone (`FLOORS`): the
attack passes (gradient w.r.t. the input only, in the mode the method attacks in) and the training pass
(every branch the step uses, backward). ACL: 5 attack passes of 2B views (eval), then natural and
adversarial 2B; SimCLR: one pass of 2B views; AdvCL: per attack step (train mode) x_cl, x_ce and the three
natural views of B images, then the same five passes; ASCL: 10 attack passes of 2B views (train mode), then
natural and adversarial 2B. The step is the trainer's own `training_step` + backward + optimiser step, on a
batch already in memory (augmentation, attack bookkeeping, losses, schedule included; loading is measured by
bench_loader.py).

    python benchmarks/bench_train.py [--methods acl,simclr,advcl,ascl] [--archs smallcnn,resnet18]
                                     [--batch-size 64] [--steps 3] [--device cpu] [--variants fp32]

`--variants` runs each method and architecture once per numeric setting, in the same run, and reports each
one's images/s against the first (the baseline): `fp32`, or `+`-joined `bf16` (autocast), `cl`
(channels_last), `compile` (torch.compile of the training forward), e.g. on a GPU
`--variants fp32,bf16+cl,bf16+cl+compile`.

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
from pipeline.shards.shardset import ShardSet
from pipeline.trainers import TrainConfig, create_trainer


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _input_grad_passes(model, inputs, branches, steps, train, device, autocast_dtype, perturbed=None):
    """`steps` attack passes: every input through its branch, gradient w.r.t. the `perturbed` inputs only
    (the others, AdvCL's natural views, are forward passes inside the attack's loss)."""
    model.train(train)
    perturbed = perturbed or [True] * len(inputs)
    xs = [x.clone() for x in inputs]
    for _ in range(steps):
        for x, p in zip(xs, perturbed):
            x.requires_grad_(p)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            total = sum(model(x, b)["features"].float().sum() for x, b in zip(xs, branches))
        grads = torch.autograd.grad(total, [x for x, p in zip(xs, perturbed) if p])
        it = iter(grads)
        xs = [(x.detach() + 1e-3 * next(it).sign()).clamp(0, 1) if p else x.detach() for x, p in zip(xs, perturbed)]
    return xs


def _train_pass(model, inputs, branches, device, autocast_dtype):
    model.train()
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = sum(sum(o.float().sum() for k, o in model(x, b).items() if k != "features")
                   for x, b in zip(inputs, branches))
    loss.backward()
    model.zero_grad(set_to_none=True)


def floor_acl(model, views, steps, device, dt):
    nat, adv = model.branch("natural"), model.branch("adversarial")
    (x,) = _input_grad_passes(model, [views], [adv], steps, False, device, dt)
    _train_pass(model, [views, x], [nat, adv], device, dt)


def floor_simclr(model, views, steps, device, dt):
    _train_pass(model, [views], [model.branch("natural")], device, dt)


def floor_advcl(model, views, steps, device, dt):
    b = len(views) // 2
    one = views[:b]
    branches = ["pgd", "normal", "normal", "normal", "pgd_ce"]
    xs = _input_grad_passes(model, [one] * 5, branches, steps, True, device, dt,
                            perturbed=[True, False, False, False, True])
    _train_pass(model, xs, branches, device, dt)


def floor_ascl(model, views, steps, device, dt):
    nat = model.branch("natural")
    (x,) = _input_grad_passes(model, [views], [nat], steps, True, device, dt)
    _train_pass(model, [views, x], [nat, nat], device, dt)


FLOORS = {"acl": floor_acl, "simclr": floor_simclr, "advcl": floor_advcl, "ascl": floor_ascl}


def pipeline_step(trainer, batch) -> float:
    from pipeline.losses import weighted_mean

    record = trainer.training_step(batch, 0)
    loss = weighted_mean(record.losses, batch.weights)
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    trainer.optimizer.step()
    return record.logs.get("attack_s", 0.0)


def timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(trainer, batch, views, attack_steps, repeats):
    """Alternate step and floor measurements and take medians: drift of a shared machine hits both alike."""
    dev = trainer.device
    floor_pass = FLOORS[trainer.name]
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


def random_pseudo_labels(ss, path):
    """AdvCL's five pseudo-labellings, drawn at random: the step's cost does not depend on what they are."""
    import numpy as np

    from pipeline.pseudolabels import DEFAULT_COUNTS, PseudoLabels

    ids = np.sort(ss.ids("train"))
    rng = np.random.default_rng(0)
    labels = np.stack([rng.integers(0, k, len(ids)) for k in DEFAULT_COUNTS], 1).astype(np.int32)
    return PseudoLabels(ids, labels, DEFAULT_COUNTS, ss.fingerprint).save(path)


VARIANT_PARTS = {"bf16": "run.bf16", "cl": "run.channels_last", "compile": "run.compile"}


def parse_variant(text: str) -> tuple[str, dict]:
    """"bf16+cl" -> its name and the run settings it turns on (everything else off: fp32, NCHW, eager)."""
    parts = [p for p in text.strip().split("+") if p and p != "fp32"]
    unknown = [p for p in parts if p not in VARIANT_PARTS]
    if unknown:
        raise SystemExit(f"--variants {text!r}: unknown {', '.join(unknown)}; use fp32 or +-joined "
                         f"{', '.join(VARIANT_PARTS)}")
    return text.strip(), {key: name in parts for name, key in VARIANT_PARTS.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="acl", help=f"Comma-separated, of {', '.join(FLOORS)}")
    ap.add_argument("--archs", default="smallcnn,resnet18")
    ap.add_argument("--batch-size", type=int, default=64, help="Images per step (2x as many views)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="Timed steps (and floors), alternating; medians reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attack-steps", type=int, default=0,
                    help="PGD steps of the training attack (default: the method's; the ImageNet configuration uses 1)")
    ap.add_argument("--variants", default="fp32",
                    help="Comma-separated numeric settings, the first the baseline: fp32 or +-joined bf16, cl, compile "
                         "(bf16 and cl act on CUDA only)")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variants.split(",")]

    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    prepare(f"synthetic:{max(4 * args.batch_size, 256)}", PrepareOptions(
        out=work / "data", image_size=args.image_size, test_fraction=0.0, progress=False))
    ss = ShardSet.open(work / "data")
    pseudo = random_pseudo_labels(ss, work / "pseudo")
    rows = []
    for method, arch, (variant, settings) in [(m, a, v) for m in args.methods.split(",")
                                              for a in args.archs.split(",") for v in variants]:
        cfg = TrainConfig()
        for k, v in {"method.name": method, "data.path": str(work / "data"), "model.arch": arch,
                     "run.out": str(work / f"{method}-{arch}-{variant}"), "data.batch_size": args.batch_size,
                     "data.workers": 0, "run.device": args.device, **settings, "optim.epochs": 10,
                     **({"attack.steps": args.attack_steps} if args.attack_steps else {}),
                     **({"advcl.pseudo_labels": str(pseudo)} if method == "advcl" else {})}.items():
            cfg.set(k, v)
        trainer = create_trainer(cfg, progress=False)
        loader = trainer._loader_for(0)
        batch = next(iter(loader))
        views = torch.rand(2 * len(batch.ids), trainer.channels, args.image_size, args.image_size,
                           device=trainer.device).contiguous(memory_format=trainer.memory_format)
        step_s, attack_s, floor_s = measure(trainer, batch, views, cfg.attack.steps, args.steps)
        images = len(batch.ids)
        base = next((r for r in rows if (r["method"], r["arch"]) == (method, arch)), None)
        rows.append({"method": method, "arch": arch, "variant": variant, "batch": images,
                     "attack_steps": cfg.attack.steps, "step_s": round(step_s, 4), "attack_s": round(attack_s, 4),
                     "update_s": round(step_s - attack_s, 4), "floor_s": round(floor_s, 4),
                     "images_per_s": round(images / step_s, 1), "floor_images_per_s": round(images / floor_s, 1),
                     "ratio_to_floor": round(step_s / floor_s, 3),
                     "speedup_vs_baseline": round(base["step_s"] / step_s, 3) if base else 1.0})
    result = {"benchmark": "train_step", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
              "device": str(trainer.device), "threads": torch.get_num_threads(), "image_size": args.image_size,
              "baseline": variants[0][0], "rows": rows}
    print(json.dumps(result))
    print(f"\ntraining step (attack + update) against its floor, {args.image_size}px, device {trainer.device}")
    print(f"{'method':7s} {'arch':10s} {'variant':16s} {'batch':>6s} {'pgd':>4s} {'images/s':>10s} {'attack s':>9s} "
          f"{'update s':>9s} {'floor s':>8s} {'x floor':>8s} {'x ' + variants[0][0]:>10s}")
    for r in rows:
        print(f"{r['method']:7s} {r['arch']:10s} {r['variant']:16s} {r['batch']:>6d} {r['attack_steps']:>4d} "
              f"{r['images_per_s']:>10.1f} {r['attack_s']:>9.3f} {r['update_s']:>9.3f} {r['floor_s']:>8.3f} "
              f"{r['ratio_to_floor']:>8.3f} {r['speedup_vs_baseline']:>10.3f}")


if __name__ == "__main__":
    main()
