"""ACL in a training loop of one's own, built from the pipeline's pieces (pipeline.api): shards, a loader over
a weighted subset in the epoch's order, a selection round from a snapshot of the model, an evaluation.

    python examples/own_loop.py                      # sklearn's digits, prepared into --out; under a minute on a CPU
    python examples/own_loop.py --data shards/cifar10-16-10k --arch wrn-16-2 --epochs 10 --out runs/mine

Each epoch after the first trains on the subset the last round chose (its per-sample weights weight the loss);
`pipeline eval --checkpoint OUT/epoch-N.pt` and `pipeline select --checkpoint ...` read the snapshots too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import pipeline.api as pl
from pipeline.errors import PipelineError


def _at_least(least: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: a whole number") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value}: at least {least}")
        return value
    return parse


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number in (0, 1]") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value}: a share of the data, in (0, 1]")
    return value


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/own-loop"))
    ap.add_argument("--data", help="a prepared shard set (default: sklearn's digits, prepared into OUT/shards)")
    ap.add_argument("--arch", default="smallcnn", help="any model.arch form: smallcnn, wrn-16-2, module:PKG.MOD:FN")
    ap.add_argument("--epochs", type=_at_least(1), default=3)
    ap.add_argument("--selector", default="rcs")
    ap.add_argument("--fraction", type=_share, default=0.3)
    ap.add_argument("--seed", type=_at_least(0), default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    shards = pl.open_shards(args.data) if args.data else pl.prepare("digits", args.out / "shards")
    model = pl.create_model(args.arch, shards, method="acl", model__head_width=64, model__proj_dim=32)
    nat, adv = model.branch("natural"), model.branch("adversarial")  # the two batch-norm branches of ACL
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
    gen = torch.Generator().manual_seed(args.seed)
    augment = pl.ContrastiveAugment(shards.image_size, min_scale=0.2)
    b = pl.budget(shards.channels, steps=2)  # eps 8/255, step 2/255, 2 PGD steps
    attack = pl.PGD(lambda x: model(x, adv, heads=("proj",))["proj"], lambda z, _: pl.nt_xent(z), b.eps, b.step,
                    b.steps, module=model, generator=gen)

    subset, snapshot = None, None
    for epoch in range(args.epochs):
        model.train()
        seen, total = 0, 0.0
        for batch in pl.loader(shards, subset, epoch=epoch, batch_size=128, seed=args.seed):
            views = torch.cat([augment(batch.images, gen), augment(batch.images, gen)])
            adv_views = attack(views)
            z_nat = model(views, nat, heads=("proj",))["proj"]
            z_adv = model(adv_views, adv, heads=("proj",))["proj"]
            per_sample = (pl.nt_xent(z_nat, reduction="sample") + pl.nt_xent(z_adv, reduction="sample")) / 2
            loss = pl.weighted_mean(per_sample, batch.weights)  # the subset's weights, or the plain mean
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen, total = seen + len(batch.ids), total + loss.detach().item() * len(batch.ids)
        snapshot = pl.save_snapshot(args.out / f"epoch-{epoch + 1}.pt", model, shards, method="acl", epoch=epoch + 1,
                                    steps=b.steps)
        line = f"epoch {epoch + 1}: {seen} images, loss {total / seen:.3f}"
        if epoch + 1 < args.epochs:  # the next epoch's subset, chosen with this epoch's model
            subset = pl.select(shards, args.selector, args.fraction, args.out / f"round-{epoch + 1:04d}.json",
                               checkpoint=snapshot, seed=args.seed + epoch)
            line += f"; {args.selector} chose {len(subset)} for epoch {epoch + 2}"
        print(line, flush=True)

    result = pl.evaluate(shards, snapshot, protocol="slf", attack="clean,pgd20", epochs=2, lr=0.1, limit=200,
                         progress=False)
    print(f"SLF on the first 200 test images: clean {100 * result['clean']:.1f}%, PGD-20 "
          f"{100 * result['pgd20']:.1f}% (chance {100 * result['chance']:.1f}%)")
    return result


if __name__ == "__main__":
    try:
        main()
    except PipelineError as exc:  # bad data, a bad --arch, a run folder it cannot write: one line, as the CLI
        sys.exit(f"error: {exc}")
