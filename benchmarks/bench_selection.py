"""Does a selector's subset do what it promises? RD(U) after real training on it, against random subsets.

From one snapshot (ACL, smallcnn, after `--warm-epochs` on the pool), every selector and `--random` random
draws pick subsets of exactly the same size from the same candidates (the pool less a held-out U, given to
every selector); each subset then gets the same real training update from that snapshot (`--epochs` ACL
epochs, the same seed and learning rate). Measured before and after, paired: RD(U), RCS's representational
divergence between the natural and PGD-on-RD views of U at the projection head, and the same on `--test`
test images. Also the score stability of RCS's proxies: two proxy passes that differ only in their seed
(augmentation and attack draws), their alignment scores' correlation and top-fraction overlap (chance = the
fraction).

A selector is valid at a setting when its subsets lower RD(U) more than random's beyond the random spread
(mean - 1 sd of the random draws) on every seed.

Variants (`--selectors`, separated by ';'): SELECTOR[:k=v,...] with the selector's parameters; `recorded=true`
selects from the rows the warm-up's last `--row-epochs` epochs recorded (select.proxies = recorded, each sample's
records averaged); `--stability-recorded K` adds the stability figures of recorded rows, each pass the mean of
K epochs' records; `fullnet[:draws=N,order=lowest]` is a
probe, not a selector: the top candidates by RCS's alignment taken through every parameter of the network
(an exact forward-mode product, `_fullnet_scores`) instead of the projection head only.

    python benchmarks/bench_selection.py [--pool 5000] [--fraction 0.2] [--seeds 0,1,2] [--random 5]
                                         [--selectors rcs,facility] [--epochs 1] [--warm-epochs 4]

Data: ../shared/data/cifar10 (class folders) at `--image-size` px when present, else a synthetic set. One JSON
line with every number, then a table per seed.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.attacks import budget
from pipeline.checkpoint import load_model, save_checkpoint
from pipeline.config import load_config
from pipeline.selectors import draw_validation
from pipeline.kv import parse_kv
from pipeline.selectors.proxies import ProxyComputer, divergence_on, head_gradient_norms
from pipeline.selectors.recorded import RowBook
from pipeline.selectors.run import run_selection
from pipeline.shards.manifest import Manifest
from pipeline.shards.prepare import PrepareOptions, prepare
from pipeline.shards.shardset import ShardSet
from pipeline.trainers import TrainConfig, create_trainer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"


def _config(data, out, epochs: int, lr: float, manifest=None) -> TrainConfig:
    cfg = TrainConfig()
    settings = {"data.path": str(data), "run.out": str(out), "model.arch": "smallcnn", "model.head_width": 256,
                "model.proj_dim": 128, "data.batch_size": 128, "data.workers": 0, "optim.optimizer": "sgd",
                "optim.lr": lr, "optim.epochs": epochs, "optim.warmup_epochs": 0, "run.device": "cpu",
                "run.log_every": 0, "run.checkpoint_every": 0, "acl.min_crop_scale": 0.2, "run.seed": 0}
    if manifest:
        settings["data.manifest"] = str(manifest)
    for k, v in settings.items():
        cfg.set(k, v)
    return cfg


def _rd(model, ss, split: str, ids: np.ndarray) -> float:
    return divergence_on(model, ss, split, ids, "acl", budget(ss.channels, None, None).eps)


def _train_from_snapshot(snapshot_run: Path, out: Path, manifest: Path, epochs: int) -> Path:
    """The same update for every subset: a copy of the snapshot's run, resumed on the subset for `epochs`."""
    shutil.copytree(snapshot_run, out)
    cfg = load_config(out / "config.toml")
    done = int(torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"])
    cfg.set("data.manifest", str(manifest))
    cfg.set("select.selector", "")  # the warm-up's selection settings: this run trains on the manifest only
    cfg.set("select.proxies", "fresh")
    cfg.set("run.out", str(out))
    cfg.set("optim.epochs", done + epochs)
    cfg.save(out / "config.toml")
    t = create_trainer(load_config(out / "config.toml"), resume=True, progress=False)
    try:
        t.fit()
    finally:
        t.close()
    return out / "checkpoints" / "last.pt"


def _stability(model, ss, candidates: np.ndarray, val: np.ndarray, fraction: float, draws: int,
               halves: tuple | None = None) -> dict:
    """Two proxy passes of `draws` draws each, differing only in their seed: how alike are their scores?
    With `halves` (two RecordedRows): the two passes take their candidates' rows from them instead (two
    disjoint sets of epochs of recorded rows), U's attack still by seed."""
    scores = {"alignment": [], "cosine": [], "grad_norm": []}
    for i, seed in enumerate((11, 12)):
        b = budget(ss.channels, None, None)
        pc = ProxyComputer(model, ss, "train", "cpu", 256, b.eps, b.step, 1, seed=seed, validation_ids=val,
                           method="acl", settings={"min_crop_scale": 0.2},
                           recorded=None if halves is None else halves[i])
        px = pc.compute(candidates, need_features=False, spread=False, draws=draws)
        scores["alignment"].append(px.alignment)
        scores["cosine"].append(px.alignment / np.linalg.norm(px.compressed_grads, axis=1))
        scores["grad_norm"].append(-head_gradient_norms(pc.head, px.row_feats, px.row_grads, px.row_branches))
    out = {"draws": draws, "chance": fraction, "source": "fresh" if halves is None else "recorded"}
    for name, (a, b2) in scores.items():
        k = max(1, int(round(fraction * len(a))))
        top_a, top_b = set(np.argsort(-a)[:k].tolist()), set(np.argsort(-b2)[:k].tolist())
        out[name] = {"correlation": float(np.corrcoef(a, b2)[0, 1]), "top_overlap": len(top_a & top_b) / k}
    return out


def _fullnet_scores(model, ss, candidates: np.ndarray, val: np.ndarray, seed: int, draws: int = 1) -> np.ndarray:
    """A probe, not a product selector: each candidate's alignment <grad of its ACL rows' loss, grad RD(U)>
    through the whole network (every parameter, not the projection head only), exactly, by one forward-mode
    product per batch: the rows' loss linearised at the head output (the proxies' row gradients held fixed),
    its directional derivative along U's RD gradient (torch.func.jvp; eval mode, so rows are independent)."""
    from torch.func import functional_call, jvp

    from pipeline.attacks import PGD
    from pipeline.augment import ContrastiveAugment, to_float
    from pipeline.losses import nt_xent, representational_divergence
    from pipeline.objectives.contrastive import contrastive_head_rows

    model.eval()
    nat, adv = model.branch("natural"), model.branch("adversarial")
    eps = budget(ss.channels, None, None).eps
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def out(p, x, branch):
        return functional_call(model, {**p, **buffers}, (x, branch), {"heads": ("proj",)})["proj"]

    gen = torch.Generator().manual_seed(seed)
    u = next(iter(ss.loader("train", np.sort(val), backend="indexed", batch_size=len(val), shuffle=False)))
    x = to_float(u.images)
    with torch.no_grad():
        z_nat = out(params, x, nat)
    pgd = PGD(lambda xx: model(xx, adv, heads=("proj",))["proj"], lambda z, zn: representational_divergence(z, zn),
              eps, 1.25 * eps / 3, 3, module=model, generator=gen)
    x_adv = pgd(x, z_nat)
    p_grad = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    rd = representational_divergence(out(p_grad, x_adv, adv), out(p_grad, x, nat))
    names = list(p_grad)
    tangent = dict(zip(names, torch.autograd.grad(rd, [p_grad[k] for k in names], allow_unused=True)))
    tangent = {k: (torch.zeros_like(params[k]) if g is None else g) for k, g in tangent.items()}
    augment = ContrastiveAugment(ss.image_size, 1.0, 0.2)
    scores = np.zeros(len(candidates))
    order = np.sort(candidates)
    for draw in range(draws):
        done = 0
        for b in ss.loader("train", order, backend="indexed", batch_size=256, shuffle=False):
            n = len(b.ids)
            views = torch.cat([augment(b.images, gen), augment(b.images, gen)])
            attack = PGD(lambda xx: model(xx, adv, heads=("proj",))["proj"], lambda z, _: nt_xent(z, 0.5), eps,
                         eps / 4, 1, module=model, generator=gen)
            x_views_adv = attack(views)
            with torch.no_grad():
                passes = [(model.features(views, nat), nat), (model.features(x_views_adv, adv), adv)]
            rows = contrastive_head_rows(model.heads["proj"], passes, n, {"temperature": 0.5})
            total = torch.zeros(n)
            for k, (xs, branch) in enumerate(((views, nat), (x_views_adv, adv))):
                _, t_out = jvp(lambda p: out(p, xs, branch), (params,), (tangent,))
                g = torch.cat([rows.grads[2 * k], rows.grads[2 * k + 1]])
                total += (g * t_out).sum(1).reshape(2, n).sum(0)
            scores[done:done + n] += total.detach().numpy() / draws
            done += n
    return scores  # in the order of np.sort(candidates)


def _variants(spec: str) -> list[tuple[str, str, dict]]:
    """"rcs;rcs:draws=4,normalize=true;facility" -> [(label, selector, params)]."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, _, kv = part.partition(":")
        out.append((part, name, parse_kv(kv, "--selectors")))
    return out


def _step_norm(trained, snapshot) -> float:
    """How far the update moved the weights (all parameters): a subset that trains less moves them less."""
    a, b = dict(trained.named_parameters()), dict(snapshot.named_parameters())
    with torch.no_grad():
        return float(torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=int, default=5000)
    ap.add_argument("--fraction", type=float, default=0.2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--random", type=int, default=5, help="random draws per seed")
    ap.add_argument("--selectors", default="rcs;facility",
                    help="variants separated by ';', each SELECTOR[:k=v,k=v] (facility gets per_class=false; "
                         "recorded=true: from the rows the warm-up's last epoch recorded)")
    ap.add_argument("--stability-draws", default="1", help="proxy draws per pass for the stability figures")
    ap.add_argument("--stability-recorded", default="", help="K,K,...: the same figures from recorded rows, each "
                    "pass the mean of K epochs' records, the two passes disjoint (alternate epochs of the warm-up's "
                    "last 2K); needs --row-epochs >= 2K and --warm-epochs >= 2K")
    ap.add_argument("--row-epochs", type=int, default=None, help="select.row_epochs of the warm-up run's book "
                    "(default: the setting's default), for the recorded=true variants")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs on each subset")
    ap.add_argument("--warm-epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--validation", type=int, default=200, help="size of U")
    ap.add_argument("--test", type=int, default=500, help="test images RD is also measured on")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    work = Path(tempfile.mkdtemp(prefix="bench-selection-"))
    per_class = max(1, args.pool // 10)
    source = f"folder:{SHARED}" if SHARED.is_dir() else f"synthetic:{args.pool + args.test}"
    prepare(source, PrepareOptions(out=work / "data", image_size=args.image_size, workers=2, progress=False,
                                   per_class={"train": per_class, "test": max(1, args.test // 10)}
                                   if SHARED.is_dir() else {}))
    ss = ShardSet.open(work / "data")
    pool = ss.ids("train")
    val = draw_validation(pool, args.validation / len(pool), seed=0)
    candidates = np.setdiff1d(pool, val)
    test_ids = ss.ids("test")[: args.test]
    Manifest.for_shardset(ss, "train", candidates).save(work / "candidates.json")
    Manifest.for_shardset(ss, "train", val).save(work / "validation.json")
    started = time.perf_counter()
    # The warm-up run holds out U itself (the same formula and seed: the same U and candidates) and records
    # its steps' selection rows (select.proxies = recorded; no round is due before its end), for the
    # variants that select from recorded rows.
    warm_cfg = _config(work / "data", work / "snapshot", args.warm_epochs, args.lr)
    for k, v in {"select.selector": "rcs", "select.proxies": "recorded", "select.warmup": args.warm_epochs,
                 "select.validation_fraction": args.validation / len(pool)}.items():
        warm_cfg.set(k, v)
    needed = max([0, *(2 * int(k) for k in args.stability_recorded.split(",") if k)])
    variant_k = args.row_epochs or warm_cfg.select.row_epochs  # the recorded=true variants' K
    warm_cfg.set("select.row_epochs", max(needed, variant_k))
    warm = create_trainer(warm_cfg, progress=False)
    warm.fit()
    save_checkpoint(work / "snap.pt", warm.snapshot(args.warm_epochs))
    warm.close()
    assert np.array_equal(Manifest.load(work / "snapshot" / "selection" / "validation.json").ids, val)
    rows_file = work / "snapshot" / "snapshots" / "book.rows"
    model, _ = load_model(work / "snap.pt")
    before = {"rd_u": _rd(model, ss, "train", val), "rd_test": _rd(model, ss, "test", test_ids)}
    stability = [_stability(model, ss, candidates, val, args.fraction, int(d)) for d in args.stability_draws.split(",")]
    if needed:
        book = RowBook(candidates, warm_cfg.select.row_epochs)
        book.load(rows_file)
        last = args.warm_epochs - 1
        for k in (int(k) for k in args.stability_recorded.split(",") if k):
            halves = tuple(book.recorded(only_epochs={last - 2 * i - j for i in range(k)}) for j in (0, 1))
            stability.append({**_stability(model, ss, candidates, val, args.fraction, 1, halves), "draws": k})
    if variant_k != warm_cfg.select.row_epochs:  # the variants' rows: the last K epochs' records
        keep = RowBook(candidates, warm_cfg.select.row_epochs)
        keep.load(rows_file)
        rows_file = work / "rows-k.rows"
        keep.recorded(since_epoch=args.warm_epochs - variant_k).save(rows_file)
    print(json.dumps({"stability": stability}), flush=True)
    rows, picked = [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        picks = [(label, name, params, seed) for label, name, params in _variants(args.selectors)] + \
                [("random", "random", {}, seed * 1000 + j) for j in range(args.random)]
        for n_pick, (label, name, params, sel_seed) in enumerate(picks):
            if name == "facility":
                params = {"per_class": False, **params}
            params = dict(params)
            recorded = rows_file if params.pop("recorded", False) else None
            out = work / "subsets" / f"{seed}-{n_pick}.json"
            t = time.perf_counter()
            if name == "fullnet":  # the probe: the top alignment through the whole network
                scores = _fullnet_scores(model, ss, candidates, val, sel_seed, int(params.get("draws", 1)))
                budget_n = int(round(args.fraction * len(candidates)))
                sign = -1 if params.get("order", "highest") == "highest" else 1  # lowest: the sign diagnostic
                chosen = np.sort(candidates)[np.argsort(sign * scores, kind="stable")[:budget_n]]
                m = Manifest.for_shardset(ss, "train", np.sort(chosen), producer={"name": "fullnet"})
                m.save(out)
            else:
                m = run_selection(ss, name, args.fraction, out, checkpoint=work / "snap.pt",
                                  pool=work / "candidates.json", validation=work / "validation.json", seed=sel_seed,
                                  params=params, recorded=recorded)
            took = time.perf_counter() - t
            ckpt = _train_from_snapshot(work / "snapshot", work / "runs" / f"{seed}-{n_pick}", out, args.epochs)
            trained, _ = load_model(ckpt)
            picked[(seed, label)] = set(m.ids.tolist())
            rows.append({"seed": seed, "selector": label, "selection_seed": sel_seed, "size": len(m),
                         "select_s": round(took, 2), "step_norm": _step_norm(trained, model),
                         "rd_u": _rd(trained, ss, "train", val), "rd_test": _rd(trained, ss, "test", test_ids)})
            print(json.dumps(rows[-1]), flush=True)
    overlaps = []  # a variant from recorded rows against the same variant from a fresh pass, where both ran
    for (seed, label), ids in picked.items():
        base = label.replace(",recorded=true", "").replace("recorded=true,", "").replace(":recorded=true", "")
        if base != label and (seed, base) in picked:
            overlaps.append({"seed": seed, "recorded": label, "fresh": base,
                             "overlap": len(ids & picked[(seed, base)]) / len(ids)})
    summary = []
    for seed in sorted({r["seed"] for r in rows}):
        rand = [r for r in rows if r["seed"] == seed and r["selector"] == "random"]
        for key in ("rd_u", "rd_test", "step_norm"):  # step_norm: the weights' move itself (before = 0)
            deltas = np.array([r[key] - before.get(key, 0.0) for r in rand])
            for r in rows:
                if r["seed"] == seed and r["selector"] != "random":
                    d = r[key] - before.get(key, 0.0)
                    summary.append({"seed": seed, "selector": r["selector"], "measure": key, "delta": d,
                                    "random_mean": float(deltas.mean()), "random_sd": float(deltas.std(ddof=1)),
                                    "minus_random": d - float(deltas.mean()),
                                    "beats_random": bool(d < deltas.mean() - deltas.std(ddof=1))})
    print(json.dumps({"benchmark": "selection_validity", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                      "data": source, "image_size": args.image_size, "pool": len(pool), "u": len(val),
                      "fraction": args.fraction, "epochs": args.epochs, "warm_epochs": args.warm_epochs,
                      "lr": args.lr, "before": before, "stability": stability, "rows": rows, "summary": summary,
                      "recorded_overlap": overlaps,
                      "seconds": round(time.perf_counter() - started, 1)}))
    print(f"\nbefore: RD(U) {before['rd_u']:.5f}, RD(test) {before['rd_test']:.5f}")
    for st in stability:
        print(f"proxy stability, {st['draws']} {'draw(s)' if st['source'] == 'fresh' else 'recorded epoch(s)'} "
              "per pass: " + "; ".join(
            f"{k} r = {st[k]['correlation']:.2f}, top-{args.fraction:.0%} overlap {st[k]['top_overlap']:.0%}"
            for k in ("alignment", "cosine", "grad_norm")) + f" (chance {args.fraction:.0%})")
    for o in overlaps:
        print(f"seed {o['seed']}: {o['recorded']} shares {o['overlap']:.0%} of its picks with {o['fresh']}")
    print(f"{'seed':>4} {'selector':>28} {'measure':>8} {'delta':>9} {'random':>18} {'minus random':>13} beats")
    for s in summary:
        print(f"{s['seed']:>4} {s['selector']:>28} {s['measure']:>8} {s['delta']:>+9.5f} "
              f"{s['random_mean']:>+9.5f} +- {s['random_sd']:.5f} {s['minus_random']:>+13.5f} {s['beats_random']}")


if __name__ == "__main__":
    main()
