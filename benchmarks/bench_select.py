"""Facility location: this project's selector against apricot (and submodlib where it runs).

Same data for every library: n points in d dimensions drawn around 1,000 centres (cosine similarity), budget
10% of n. Ours: FAISS k-NN graph (exact up to knn.FLAT_LIMIT points, IVF above) + numba lazy greedy. apricot: its lazy
greedy on the same sparse graph (passed precomputed, symmetric, int32 indices). submodlib: dense
facility location (its fast path; n^2 memory) and LazyGreedy. Every objective is evaluated on our graph.

    python benchmarks/bench_select.py [--sizes 10000,50000,200000,1000000] [--dim 128] [--k 20]

Targets (issue 4): >= 10x faster than apricot at n = 50k with >= 99.5% of its objective; n = 1M < 10 min.

`--mode rcs`: the cost of one RCS round (default parameters) against a full-pool ACL epoch of the same model,
both measured in the same run: alone, and overlapped (the round in a background process at lower priority, as
the trainer runs it, while the epoch trains). CIFAR-10 from ../shared/data (synthetic images when absent).

    python benchmarks/bench_select.py --mode rcs --pools 10000,50000 [--image-size 16] [--fraction 0.2]

Target (issue 7): a round costs at most 0.5 of a full-pool epoch, alone and overlapped.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import scipy.sparse as sp

from pipeline.selectors.greedy import facility_value, maximize
from pipeline.selectors.knn import knn_graph


def make_data(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, d)).astype(np.float32)
    return centres[rng.integers(0, 1000, n)] + 0.6 * rng.normal(size=(n, d)).astype(np.float32)


def run_apricot(graph, budget):
    import apricot

    csr = sp.csr_matrix(graph, dtype=np.float64)
    csr.indices, csr.indptr = csr.indices.astype(np.int32), csr.indptr.astype(np.int32)
    start = time.perf_counter()
    sel = apricot.FacilityLocationSelection(budget, metric="precomputed", optimizer="lazy").fit(csr)
    return time.perf_counter() - start, np.asarray(sel.ranking)


def run_submodlib(x, budget, k):
    from submodlib import FacilityLocationFunction

    start = time.perf_counter()
    # its sparse mode builds the graph in Python (minutes at 10k points); the dense kernel is its fast path
    f = FacilityLocationFunction(n=len(x), mode="dense", data=x, metric="cosine")
    picks = f.maximize(budget=budget, optimizer="LazyGreedy", stopIfZeroGain=False, stopIfNegativeGain=False,
                       verbose=False, show_progress=False)
    return time.perf_counter() - start, np.array([p[0] for p in picks])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="facility", choices=("facility", "rcs"))
    ap.add_argument("--pools", default="10000,50000", help="rcs: pool sizes")
    ap.add_argument("--image-size", type=int, default=16, help="rcs: image size of the shard set")
    ap.add_argument("--device", default="cpu", help="rcs: cpu | cuda")
    ap.add_argument("--sizes", default="10000,50000,200000,1000000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=0.1, help="budget share (rcs: use 0.2)")
    ap.add_argument("--apricot-max", type=int, default=200000, help="Largest n to run apricot on")
    ap.add_argument("--submodlib-max", type=int, default=10000, help="Largest n to run submodlib on (dense: n^2 memory)")
    args = ap.parse_args(argv)
    if args.mode == "rcs":
        from bench_rcs import rcs_rounds

        return rcs_rounds(args)
    maximize(knn_graph(make_data(100, 8), 5)[0], 5)  # compile the numba kernels outside the timings
    rows = []
    for n in map(int, args.sizes.split(",")):
        x = make_data(n, args.dim)
        budget = int(n * args.fraction)
        t0 = time.perf_counter()
        graph, backend = knn_graph(x, args.k)
        t1 = time.perf_counter()
        ours = maximize(graph, budget, "lazy")
        t2 = time.perf_counter()
        row = {"n": n, "budget": budget, "knn_backend": backend, "knn_s": round(t1 - t0, 2),
               "greedy_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 2), "objective": facility_value(graph, ours.picks)}
        if n <= args.apricot_max:
            try:
                secs, picks = run_apricot(graph, budget)
                row.update(apricot_greedy_s=round(secs, 3), apricot_objective=facility_value(graph, picks),
                           speedup_vs_apricot=round(secs / max(row["greedy_s"], 1e-9), 1))
                row["objective_vs_apricot"] = round(row["objective"] / row["apricot_objective"], 5)
            except ImportError:
                row["apricot"] = "not installed"
        if n <= args.submodlib_max:
            try:
                secs, picks = run_submodlib(x, budget, args.k)
                row.update(submodlib_s=round(secs, 2), submodlib_objective=facility_value(graph, picks))
                row["objective_vs_submodlib"] = round(row["objective"] / row["submodlib_objective"], 5)
            except ImportError:
                row["submodlib"] = "not installed"
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({"benchmark": "select_facility", "date": time.strftime("%Y-%m-%d"), "machine": platform.node(),
                      "dim": args.dim, "k": args.k, "fraction": args.fraction, "rows": rows}))
    print(f"\n{'n':>9s} {'kNN s':>7s} {'greedy s':>9s} {'apricot s':>10s} {'x faster':>9s} {'obj/apricot':>12s} "
          f"{'submodlib s':>12s} {'obj/submodlib':>14s}")
    for r in rows:
        print(f"{r['n']:>9,d} {r['knn_s']:>7.1f} {r['greedy_s']:>9.3f} {r.get('apricot_greedy_s', float('nan')):>10.2f} "
              f"{r.get('speedup_vs_apricot', float('nan')):>9.1f} {r.get('objective_vs_apricot', float('nan')):>12.4f} "
              f"{r.get('submodlib_s', float('nan')):>12.1f} {r.get('objective_vs_submodlib', float('nan')):>14.4f}")


if __name__ == "__main__":
    main()
