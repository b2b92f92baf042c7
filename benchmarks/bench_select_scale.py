"""Selection at ImageNet scale: k-NN backends, and facility location end to end at n = 1.28M.

Data: n points in d dimensions around 1,000 centres (as bench_select.py), cosine similarity, k = 20.

`--mode knn`: the k-NN graph by exact search (faiss-flat) against IVF (faiss-ivf: nlist 4 sqrt(n), nprobe
16), and on a GPU faiss-gpu and torch; time and recall of the true k nearest (on 2,000 query points) per
size: where exact search stops paying, i.e. the FLAT_LIMIT of pipeline/selectors/knn.py.

    python benchmarks/bench_select_scale.py --mode knn --sizes 25000,50000,100000,200000 [--device cuda]

`--mode facility`: facility location of `--fraction` of n end to end (k-NN graph + lazy greedy + weights),
with the automatic backend and with GreeDi (`--partitions`, parts run one after another here: the time a
machine of m processes would take is about the slowest part plus the merge), at `--n` (1.28M); then on a
`--sample` (100k) the same pipelines judged against the greedy on the exact k-NN graph (baseline, same run):
objective of each choice on the exact graph / the exact greedy's objective.

    python benchmarks/bench_select_scale.py --mode facility --n 1281167 --sample 100000 --partitions 8
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from pipeline.selectors.facility import facility_select, greedi_select
from pipeline.selectors.greedy import facility_value
from pipeline.selectors.knn import _normalise, knn_graph, search


def make_data(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 200_000):  # in blocks: 1.28M x 128 float64 noise would be 1.3 GB at once
        m = min(n, s + 200_000) - s
        out[s:s + m] = centres[rng.integers(0, 1000, m)] + 0.6 * rng.normal(size=(m, d)).astype(np.float32)
    return out


def knn_mode(args) -> list[dict]:
    backends = (args.backends.split(",") if args.backends else  # the first is each size's baseline
                ["faiss-flat", "faiss-ivf"] + (["faiss-gpu", "torch"] if args.device == "cuda" else []))
    rows = []
    for n in map(int, args.sizes.split(",")):
        x = _normalise(make_data(n, args.dim))
        queries = np.random.default_rng(1).choice(n, min(n, 2000), replace=False)
        _, truth, _ = search(x, x[queries], args.k, "faiss-flat")
        for backend in backends:
            try:
                t = time.perf_counter()
                sims, idx, _ = search(x, x, args.k, backend, 0, args.device)
                secs = time.perf_counter() - t
            except Exception as exc:  # a backend this machine lacks (faiss-gpu without the gpu extra)
                rows.append({"n": n, "backend": backend, "error": str(exc)[:120]})
                continue
            recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(idx[queries], truth)])
            rows.append({"n": n, "backend": backend, "seconds": round(secs, 2), "recall": round(float(recall), 4)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def facility_mode(args) -> list[dict]:
    rows = []
    x = make_data(args.n, args.dim)
    budget = int(args.n * args.fraction)
    for label, run in (("auto", lambda: facility_select(x, budget, args.k, "lazy", None, "auto", 0, args.device)),
                       (f"greedi-{args.partitions}", lambda: greedi_select(x, budget, args.k, "lazy", None, "auto", 0,
                                                                          args.device, args.partitions))):
        t = time.perf_counter()
        picks, weights, _, timing = run()
        rows.append({"n": args.n, "pipeline": label, "budget": budget, "seconds": round(time.perf_counter() - t, 1),
                     "knn_s": round(timing["knn"], 1), "greedy_s": round(timing["greedy"], 1),
                     "knn_backend": timing["knn_backend"], "weights_sum": int(weights.sum())})
        print(json.dumps(rows[-1]), flush=True)
    sample = x[np.random.default_rng(2).choice(args.n, args.sample, replace=False)]
    b = int(args.sample * args.fraction)
    t = time.perf_counter()
    exact_graph, _ = knn_graph(sample, args.k, "faiss-flat")
    exact_picks, _, _, _ = facility_select(sample, b, args.k, "lazy", None, "faiss-flat", 0)
    exact_s = time.perf_counter() - t
    best = facility_value(exact_graph, exact_picks)
    rows.append({"n": args.sample, "pipeline": "exact greedy (baseline)", "budget": b, "seconds": round(exact_s, 1),
                 "objective_vs_exact": 1.0})
    print(json.dumps(rows[-1]), flush=True)
    for label, kw in (("ivf", {"backend": "faiss-ivf"}), (f"greedi-{args.partitions}", {"partitions": args.partitions}),
                      (f"greedi-{args.partitions}-ivf", {"partitions": args.partitions, "backend": "faiss-ivf"})):
        t = time.perf_counter()
        if "partitions" in kw:
            picks, *_ = greedi_select(sample, b, args.k, "lazy", None, kw.get("backend", "faiss-flat"), 0, args.device,
                                      kw["partitions"])
        else:
            picks, *_ = facility_select(sample, b, args.k, "lazy", None, kw["backend"], 0, args.device)
        rows.append({"n": args.sample, "pipeline": label, "budget": b, "seconds": round(time.perf_counter() - t, 1),
                     "objective_vs_exact": round(facility_value(exact_graph, picks) / best, 4)})
        print(json.dumps(rows[-1]), flush=True)
    random = np.random.default_rng(0).choice(args.sample, b, replace=False)
    rows.append({"n": args.sample, "pipeline": "random (floor)", "budget": b, "seconds": 0.0,
                 "objective_vs_exact": round(facility_value(exact_graph, random) / best, 4)})
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="facility", choices=("knn", "facility"))
    ap.add_argument("--sizes", default="25000,50000,100000,200000", help="knn: sizes")
    ap.add_argument("--n", type=int, default=1_281_167, help="facility: points end to end (ImageNet-1K's train set)")
    ap.add_argument("--sample", type=int, default=100_000, help="facility: sample judged against the exact greedy")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (adds faiss-gpu and torch to --mode knn)")
    ap.add_argument("--backends", default="", help="knn: comma-separated, instead of the device's list "
                    "(at 1.28M leave out faiss-flat: exact search on CPUs takes tens of minutes)")
    args = ap.parse_args(argv)
    rows = knn_mode(args) if args.mode == "knn" else facility_mode(args)
    print(json.dumps({"benchmark": f"select_scale_{args.mode}", "date": time.strftime("%Y-%m-%d"),
                      "machine": platform.node(), "device": args.device, "dim": args.dim, "k": args.k, "rows": rows}))
    print()
    if args.mode == "knn":
        timed = [r for r in rows if "seconds" in r]
        first = {}
        for r in timed:  # the baseline of each size: the first backend listed that ran (faiss-flat by default)
            first.setdefault(r["n"], r)
        print(f"{'n':>9s} {'backend':>11s} {'seconds':>9s} {'recall':>7s} {'faster than the first':>22s}")
        for r in timed:
            print(f"{r['n']:>9,d} {r['backend']:>11s} {r['seconds']:>9.2f} {r['recall']:>7.3f} "
                  f"{first[r['n']]['seconds'] / r['seconds']:>21.2f}x ({first[r['n']]['backend']})")
    else:
        print(f"{'n':>9s} {'pipeline':>24s} {'seconds':>9s} {'objective / exact greedy':>25s}")
        for r in rows:
            print(f"{r['n']:>9,d} {r['pipeline']:>24s} {r['seconds']:>9.1f} {r.get('objective_vs_exact', float('nan')):>25.4f}")


if __name__ == "__main__":
    main()
