"""Pseudo-labels: k-means clusters of an encoder's features, one labelling per cluster count, keyed by sample id.

AdvCL (Fan et al. 2021) trains pseudo-label heads on clusters of features from a separately pre-trained,
non-robust contrastive model (its reference ships them as a pickle). Here they are computed from any encoder
checkpoint (`pipeline train --method simclr` gives the reference's kind) with FAISS k-means, seeded, and
stored like a manifest: a JSON header beside two content-named .npy arrays,

    FILE.json                 format, shard-set fingerprint, split, checkpoint path and digest, counts, seed, ...
    FILE.DIGEST.ids.npy       int64 sample ids, sorted
    FILE.DIGEST.labels.npy    int32, one column per cluster count

Arrays first, header last (atomic renames), the old pair removed after the switch; the header carries the
arrays' digests, so a header paired with other arrays, or a file made on other data, is refused with a
message naming both.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import write_json, write_npy
from pipeline.augment import to_float
from pipeline.checkpoint import load_model
from pipeline.errors import DataError, PipelineError
from pipeline.models.multibn import use_branch
from pipeline.progress import progress_bar
from pipeline.shards.layout import file_sha256
from pipeline.shards.manifest import array_digest, owned_array
from pipeline.shards.shardset import ShardSet
from pipeline.validate import Fields, parse_json, read_array

FORMAT = "pipeline.pseudo-labels"
DEFAULT_COUNTS = (2, 10, 50, 100, 500)  # AdvCL's five heads


def _digest(path) -> str:
    return file_sha256(path)[:16]


def _header(path: str | Path) -> Path:
    p = Path(path)
    return p if p.suffix == ".json" else p.with_name(p.name + ".json")


def _read_header(header_path: Path) -> dict | None:
    try:
        h = parse_json(header_path.read_text())
    except (OSError, ValueError):
        return None
    return h if isinstance(h, dict) and h.get("format") == FORMAT else None


def _owned_arrays(header_path: Path) -> list[Path]:
    """The arrays an existing header of ours names and provably wrote (content-named, digest matching)."""
    h = _read_header(header_path) or {}
    stem = header_path.with_suffix("").name
    named = [header_path.parent / Path(str(h[k])).name for k in ("ids_file", "labels_file") if h.get(k)]
    return [p for p in named if owned_array(p, stem, (".ids", ".labels"))]


@dataclass
class PseudoLabels:
    ids: np.ndarray  # sorted int64
    labels: np.ndarray  # (len(ids), len(counts)) int32
    counts: tuple[int, ...]
    dataset_fingerprint: str
    split: str = "train"
    extra: dict | None = None

    def save(self, path: str | Path) -> Path:
        """As a manifest is saved: content-named arrays, the header written last (the switch: one rename), the
        old pair removed after it; a kill at any moment leaves the old or the new set readable. A target that
        exists and is not a pseudo-label header of ours (a shard set's index.json, ...) is refused."""
        header = _header(path)
        if header.is_dir() or (header.exists() and _read_header(header) is None):
            raise DataError(f"{header}: exists and is not a pseudo-label file of this tool; refusing to replace it "
                            "(choose another --out)")
        header.parent.mkdir(parents=True, exist_ok=True)
        stem = header.with_suffix("").name
        ids, labels = np.asarray(self.ids, dtype=np.int64), np.asarray(self.labels, dtype=np.int32)
        ids_path = header.with_name(f"{stem}.{array_digest(ids)}.ids.npy")
        labels_path = header.with_name(f"{stem}.{array_digest(labels)}.labels.npy")
        write_npy(ids_path, ids)
        write_npy(labels_path, labels)
        old = _owned_arrays(header)
        write_json(header, {"format": FORMAT, "version": 1, "dataset_fingerprint": self.dataset_fingerprint,
                            "split": self.split, "counts": list(self.counts), "samples": int(len(self.ids)),
                            "ids_file": ids_path.name, "ids_sha256": _digest(ids_path),
                            "labels_file": labels_path.name, "labels_sha256": _digest(labels_path),
                            **(self.extra or {})})
        for p in old:
            if p not in (ids_path, labels_path):
                p.unlink(missing_ok=True)
        return header

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> "PseudoLabels":
        header_path = _header(path)
        try:
            h = parse_json(header_path.read_text())
        except FileNotFoundError:
            raise DataError(f"{header_path}: no such pseudo-label file; make one with `pipeline pseudo-labels`") from None
        except (ValueError, UnicodeDecodeError):
            raise DataError(f"{header_path}: not JSON; make it again with `pipeline pseudo-labels`") from None
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise DataError(f"{header_path}: not a pseudo-label file of this tool")
        if fingerprint is not None and h.get("dataset_fingerprint") != fingerprint:
            raise DataError(f"{header_path}: made on the shard set with fingerprint {h.get('dataset_fingerprint')}, "
                            f"but the data here has {fingerprint}; make it again on this data")
        arrays = []
        for key in ("ids", "labels"):
            p = header_path.parent / Path(str(h.get(f"{key}_file"))).name
            if not p.is_file() or _digest(p) != h.get(f"{key}_sha256"):
                raise DataError(f"{header_path}: its {key} array {p.name} is missing or not the one it was written "
                                "with; make the file again")
            arrays.append(read_array(p, "make the file again with `pipeline pseudo-labels`"))
        ids, labels = arrays
        f = Fields(header_path, h, "make the file again with `pipeline pseudo-labels`")
        counts = f.list("counts")
        if not counts or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in counts):
            f.fail("counts", counts, "must be a list of cluster counts > 0")
        f.int("samples", len(ids), len(ids))
        if ids.dtype != np.int64 or ids.ndim != 1 or (len(ids) > 1 and np.any(np.diff(ids) <= 0)):
            raise DataError(f"{header_path}: its ids must be increasing int64 sample ids (found {ids.dtype} "
                            f"{ids.shape}); make the file again")
        if labels.dtype != np.int32 or labels.shape != (len(ids), len(counts)):
            raise DataError(f"{header_path}: its labels must be int32 of shape ({len(ids)}, {len(counts)}) (found "
                            f"{labels.dtype} {labels.shape}); make the file again")
        if len(ids) and (labels.min() < 0 or np.any(labels.max(0) >= np.asarray(counts))):
            raise DataError(f"{header_path}: a label is outside its cluster count {counts}; make the file again")
        extra = {k: v for k, v in h.items() if k not in ("format", "version", "dataset_fingerprint", "split",
                                                         "counts", "samples")}
        return cls(ids, labels, tuple(h["counts"]), h["dataset_fingerprint"], h.get("split", "train"), extra)

    def lookup(self, ids) -> torch.Tensor:
        """(len(ids), len(counts)) int64 labels of these samples; a sample the file lacks is an error."""
        ids = np.asarray(ids.cpu() if torch.is_tensor(ids) else ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids).clip(0, len(self.ids) - 1)
        missing = ids[self.ids[pos] != ids]
        if len(missing):
            raise DataError(f"pseudo-labels: sample {missing[0]} has none (made for another subset of the data?)")
        return torch.from_numpy(self.labels[pos].astype(np.int64))


@torch.no_grad()
def encoder_features(model, shardset, split: str, role: str = "eval", device="cpu", batch_size: int = 256,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, float32 encoder features) of every sample of `split`, through the branch playing `role`."""
    model = model.to(device).eval()
    ids, feats = [], []
    loader = shardset.loader(split, backend="indexed", batch_size=batch_size, shuffle=False, device=device)
    with progress_bar(progress) as bar, use_branch(model, model.branch(role)):
        task = bar.add_task("features", total=shardset.count(split))
        for b in loader:
            feats.append(model.encoder(to_float(b.images)).float().cpu())
            ids.append(b.ids.cpu())
            bar.advance(task, len(b.ids))
    ids, feats = torch.cat(ids).numpy().astype(np.int64), torch.cat(feats).numpy()
    order = np.argsort(ids)
    return ids[order], feats[order]


def kmeans_labels(features: np.ndarray, k: int, seed: int = 0, iterations: int = 20) -> np.ndarray:
    """FAISS k-means on L2-normalised features (seeded); every sample's nearest centroid."""
    import faiss

    x = np.ascontiguousarray(features, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
    if k > len(x):
        raise PipelineError(f"--clusters {k}: more clusters than the {len(x)} samples")
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, verbose=False, min_points_per_centroid=1,
                      max_points_per_centroid=1 << 20)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0].astype(np.int32)


def make_pseudo_labels(data, checkpoint, counts=DEFAULT_COUNTS, split: str = "train", seed: int = 0,
                       device="cpu", role: str = "eval", progress: bool = True) -> PseudoLabels:
    counts = tuple(int(c) for c in counts)
    if not counts or any(c < 2 for c in counts):
        raise PipelineError(f"--clusters {','.join(map(str, counts))}: each count must be at least 2")
    ss = ShardSet.open(data)
    model, ckpt = load_model(checkpoint)
    if model.spec.get("in_channels") != ss.channels:
        raise PipelineError(f"{checkpoint}: the model takes {model.spec.get('in_channels')}-channel images, "
                            f"{data} has {ss.channels}-channel ones")
    started = time.perf_counter()
    ids, feats = encoder_features(model, ss, split, role, device, progress=progress)
    labels = np.stack([kmeans_labels(feats, k, seed) for k in counts], axis=1)
    return PseudoLabels(ids, labels, counts, ss.fingerprint, split, extra={
        "checkpoint": str(checkpoint), "checkpoint_sha256": _digest(Path(checkpoint)), "method": ckpt.get("method"),
        "branch_role": role, "seed": seed, "feature_dim": int(feats.shape[1]), "kmeans": "faiss.Kmeans, 20 "
        "iterations, L2-normalised features", "seconds": round(time.perf_counter() - started, 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


__all__ = ["DEFAULT_COUNTS", "PseudoLabels", "encoder_features", "kmeans_labels", "make_pseudo_labels"]
