"""k-nearest-neighbour graphs under cosine similarity: FAISS (CPU flat or IVF, GPU) or torch brute force.

`knn_graph` returns a symmetric sparse similarity matrix (scipy CSR, int32 indices) with entries
max(s_ij, s_ji) for j among i's k nearest neighbours (or i among j's), self-similarity included, negative
similarities dropped. Row i lists the points candidate i covers.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp

from pipeline.dist import gather_rows, rank_and_world
from pipeline.errors import PipelineError

BACKENDS = ("auto", "faiss-flat", "faiss-ivf", "faiss-gpu", "torch")
# Exact search up to here, IVF above. Measured (benchmarks/bench_select_scale.py --mode knn, RESULTS.md): exact
# costs 2.9 s at 25k and grows as n^2 (47 s at 100k); IVF is 2.6x faster at 25k and 6x at 100k, recall >= 0.998.
FLAT_LIMIT = 25_000


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _faiss_search(base: np.ndarray, queries: np.ndarray, k: int, backend: str, seed: int):
    import faiss

    n, d = base.shape
    if backend == "faiss-gpu":
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            raise PipelineError("faiss-gpu: no GPU FAISS here; install the gpu extra on a GPU machine, or use faiss-flat")
        res = faiss.StandardGpuResources()
        sims, idx = faiss.knn_gpu(res, queries, base, min(k, 2048), metric=faiss.METRIC_INNER_PRODUCT)
        return sims, idx
    if backend == "faiss-ivf":
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = base[rng.choice(n, min(n, 64 * nlist), replace=False)]
        index.train(train)
        index.add(base)
        index.nprobe = min(nlist, 16)
        return index.search(queries, k)
    index = faiss.IndexFlatIP(d)
    index.add(base)
    return index.search(queries, k)


def _torch_search(base: np.ndarray, queries: np.ndarray, k: int, device: str, max_elements: int | None = None):
    """Brute force in blocks of queries whose similarity rows stay within `max_elements` floats (4 GiB on a GPU,
    256 MiB on a CPU): at 1.28M points a fixed 8,192-query block would be 42 GB."""
    import torch

    if max_elements is None:
        max_elements = 1 << 30 if str(device).startswith("cuda") else 1 << 26
    chunk = max(1, min(8192, max_elements // max(1, len(base))))
    bt = torch.from_numpy(base).to(device)
    sims, idx = [], []
    for s in range(0, len(queries), chunk):
        top = (torch.from_numpy(queries[s:s + chunk]).to(device) @ bt.T).topk(k, dim=1)
        sims.append(top.values.cpu().numpy())
        idx.append(top.indices.cpu().numpy())
    return np.concatenate(sims), np.concatenate(idx)


def search(base: np.ndarray, queries: np.ndarray, k: int, backend: str = "auto", seed: int = 0,
           device: str = "cpu") -> tuple[np.ndarray, np.ndarray, str]:
    """(similarities, indices into `base`, backend used) of each query's k most similar base vectors; both
    already normalised."""
    k = max(1, min(k, len(base)))
    backend = choose_backend(len(base), backend, device)
    if backend == "torch":
        return (*_torch_search(base, queries, k, device), backend)
    return (*_faiss_search(base, queries, k, backend, seed), backend)


def choose_backend(n: int, backend: str = "auto", device: str = "cpu") -> str:
    """GPU FAISS when installed with a GPU; else torch brute force when selecting on a CUDA device; on a CPU,
    exact search by torch's matrix product up to FLAT_LIMIT points (1.7-4.5x faster than faiss-flat on 2 cores,
    the same neighbours: benchmarks/RESULTS.md) and FAISS IVF above."""
    if backend not in BACKENDS:
        raise PipelineError(f"--knn-backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    try:
        import faiss
    except ImportError:
        return "torch"
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    if str(device).startswith("cuda"):
        return "torch"
    return "torch" if n <= FLAT_LIMIT else "faiss-ivf"


def knn_graph(vectors: np.ndarray, k: int = 20, backend: str = "auto", seed: int = 0, device: str = "cpu",
              spread: bool = False):
    """(symmetric CSR similarity graph, backend used). With `spread` under torch.distributed each rank searches
    the neighbours of its block of points and every rank gets the whole graph."""
    x = _normalise(vectors)
    n = len(x)
    rank, world = rank_and_world() if spread else (0, 1)
    if world > 1:
        import torch

        lo, hi = n * rank // world, n * (rank + 1) // world
        sims, idx, backend = search(x, x[lo:hi], k, backend, seed, device)
        sims = gather_rows(torch.from_numpy(np.ascontiguousarray(sims))).numpy()
        idx = gather_rows(torch.from_numpy(np.ascontiguousarray(idx).astype(np.int64))).numpy()
    else:
        sims, idx, backend = search(x, x, k, backend, seed, device)
    everyone = np.arange(n)
    hits = _hits(sims, idx, n, (everyone, everyone))  # every point covers itself
    g = hits.maximum(hits.T).tocsr()
    g.indices = g.indices.astype(np.int32)
    g.indptr = g.indptr.astype(np.int32) if g.nnz < 2**31 else g.indptr
    return g, backend


def cover_graph(vectors: np.ndarray, candidates: np.ndarray, k: int = 20, backend: str = "auto", seed: int = 0,
                device: str = "cpu"):
    """(CSR candidates x points, backend used): entry (c, i) = similarity of point i to candidate c for the k
    candidates most similar to each point (negatives dropped); a candidate covers itself with 1. GreeDi's merge
    step: the union of the parts' picks, judged on how well it covers every point."""
    x = _normalise(vectors)
    candidates = np.asarray(candidates, dtype=np.int64)
    sims, idx, backend = search(x[candidates], x, k, backend, seed, device)
    hits = _hits(sims, idx, len(candidates), (candidates, np.arange(len(candidates))))  # points x candidates
    return hits.T.tocsr(), backend


def _hits(sims: np.ndarray, idx: np.ndarray, n_base: int, itself: tuple[np.ndarray, np.ndarray]) -> sp.csr_matrix:
    """CSR queries x base of a search's positive similarities, with 1 at the (query, base) pairs `itself` (a
    point covers itself whether or not the search returned it), at most 1."""
    rows = np.repeat(np.arange(len(idx), dtype=np.int64), idx.shape[1])
    cols, vals = idx.reshape(-1).astype(np.int64), sims.reshape(-1).astype(np.float32)
    keep = (cols >= 0) & (vals > 0)
    rows = np.concatenate([rows[keep], itself[0]])
    cols = np.concatenate([cols[keep], itself[1]])
    vals = np.concatenate([vals[keep], np.ones(len(itself[0]), np.float32)])
    g = sp.coo_matrix((vals, (rows, cols)), shape=(len(idx), n_base)).tocsr()
    g.sum_duplicates()
    g.data = np.minimum(g.data, 1.0)
    return g
