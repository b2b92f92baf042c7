"""Rows recorded by training (`select.proxies = recorded`): what a proxy pass would compute, taken from the
steps that already ran.

During training the trainer keeps, for every sample it trains on, the selection head's inputs of the sample's
rows in the step's forward and each row's loss gradient at the head output (the method's `rows_from_step`, the
head in eval mode, so that a row passes it on its own as in the proxies), by sample id: head inputs float16,
gradients float32 (they are small numbers). A sample keeps its last `select.row_epochs` records (K slots, the
oldest replaced): a round sees a sample's records as K draws of its rows, each loss gradient divided by the
number it has, so its rebuilt gradient is the mean of its last K visits' (the stability of K fresh draws at no
extra pass: benchmarks/RESULTS.md). At a selection point the rows go to the round (in the trainer's process,
or written beside its snapshot, RUN/snapshots/round-NNNN.rows) and the round computes fresh rows only for the
candidates without a record (or with none younger than `select.row_age` epochs) and for U. Encoder features
(k-center greedy, facility over features) come from the same records: the mean of a sample's natural-branch
head inputs, which are its augmented views' features in train mode.

The approximation: rows come from the model as it was at that step (it moved during the epoch, and more for
older records), from the training attack and augmentation (not the proxies' 1-step attack), and from encoder
features in train mode (batch statistics); the head gradients are taken at the head of that step. Memory: a
sample keeps K x R rows of a feature (2 bytes per value) and a head-output gradient (4 bytes per value): ACL's 4
rows at ResNet-18 (512, 128) are 6.1 kB per record, 6.1 GB per million samples and record kept (the book is
saved with each checkpoint).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_path
from pipeline.errors import DataError, PipelineError
from pipeline.objectives import HeadRows


def _load_arrays(f, count: int) -> list:
    out = []
    for _ in range(count):
        try:
            out.append(np.load(f, allow_pickle=False))
        except EOFError:
            out.append(None)  # an optional trailing array an older file does not have
    return out


class _Hashing:
    """A file object's writes, hashed on the way (np.save writes through `write`)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)


def _write_sealed(path, arrays, origin: str | None) -> Path:
    """The arrays one after another, then the seal: (the sha256 of every byte before it, the data set's
    fingerprint). A damaged file, or one from another data set, is refused where it is read."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        w = _Hashing(f)
        for a in arrays:
            np.save(w, a, allow_pickle=False)
        np.save(f, np.array([w.sha.hexdigest(), origin or ""], dtype=np.str_), allow_pickle=False)
    return Path(path)


def _check_seal(path, f, fingerprint: str | None) -> str | None:
    """After the arrays were read from `f`: the seal that follows, checked against the bytes before it and
    against `fingerprint` (the data set a round reads). A file written before seals existed has none (None)."""
    end = f.tell()
    try:
        seal = np.load(f, allow_pickle=False)
    except EOFError:
        return None
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: recorded rows with a damaged seal ({exc}); select with select.proxies = fresh "
                        "or start the run afresh") from None
    if seal.shape != (2,) or seal.dtype.kind != "U":
        raise DataError(f"{path}: recorded rows with a damaged seal; select with select.proxies = fresh")
    sha = hashlib.sha256()
    with open(path, "rb") as again:
        left = end
        while left:
            chunk = again.read(min(left, 1 << 24))
            if not chunk:
                break
            sha.update(chunk)
            left -= len(chunk)
    if sha.hexdigest() != str(seal[0]):
        raise DataError(f"{path}: recorded rows that do not match their seal (damaged or edited); select with "
                        "select.proxies = fresh or start the run afresh")
    origin = str(seal[1]) or None
    if fingerprint is not None and origin is not None and origin != fingerprint:
        raise DataError(f"{path}: rows recorded on the data set with fingerprint {origin}, not this one "
                        f"({fingerprint}): another run's file; select with select.proxies = fresh")
    return origin


def _check_finite(path, feats: np.ndarray, grads: np.ndarray) -> None:
    """Rows a non-finite step wrote would make every similarity NaN and a selector pick duplicates."""
    for name, a in (("feats", feats), ("grads", grads)):
        if a.size and not np.isfinite(a).all():
            raise DataError(f"{path}: recorded {name} hold non-finite values (NaN or inf); select with "
                            "select.proxies = fresh")


@dataclass
class RecordedRows:
    """What a round reads: each sample's S rows (K records of R rows, the valid ones first; the rows of missing
    records are zeros, which add nothing to a rebuilt gradient), each loss gradient already divided by the
    sample's record count."""

    ids: np.ndarray  # (n,) sorted sample ids
    feats: np.ndarray  # (n, S, d) float16 head inputs
    grads: np.ndarray  # (n, S, p) float32 loss gradients at the head output (small: float16 would lose them)
    branches: tuple  # the batch-norm branch of each of the S rows
    epochs: np.ndarray  # (n,) the epoch (0-based) of each sample's newest record
    counts: np.ndarray | None = None  # (n,) records per sample (None: one each)
    slots: int = 1  # K: how many records the rows of a sample hold (S = K x R)
    origin: str | None = None  # the fingerprint of the data set the rows were recorded on

    def __post_init__(self):
        if self.counts is None:
            self.counts = np.ones(len(self.ids), np.int64)

    def save(self, path: str | Path) -> Path:
        """Seven .npy arrays one after another in one file (ids, feats, grads, epochs, branches, counts, slots),
        then the seal: no zip container, whose checksums made np.savez 6x slower for a book saved every epoch."""
        return _write_sealed(path, (self.ids, self.feats, self.grads, self.epochs,
                                    np.array(self.branches, dtype=np.str_), self.counts,
                                    np.array([self.slots], np.int64)), self.origin)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str | None = None) -> "RecordedRows":
        """Validated: plain arrays only (no pickles), shapes that agree, sorted unique ids, finite values, the
        seal (the bytes as written; recorded on the data set of `fingerprint`, when given). A run's whole book
        (RUN/snapshots/book.rows) loads as the rows a round of that run would read."""
        try:
            with open(path, "rb") as f:
                ids, feats, grads, epochs, branches = (np.load(f, allow_pickle=False) for _ in range(5))
                if feats.ndim == 4:  # a book: (n, K, R, d) records, then visits
                    (tail,), slots = _load_arrays(f, 1), None
                    origin = _check_seal(path, f, fingerprint)
                else:
                    tail, slots = _load_arrays(f, 2)
                    origin = _check_seal(path, f, fingerprint) if slots is not None else None
        except (OSError, ValueError, EOFError) as exc:
            raise PipelineError(f"{path}: not a file of recorded selection rows ({exc}); select with "
                                "select.proxies = fresh, or record it again") from None
        _check_finite(path, feats, grads)
        if feats.ndim == 4:
            book = RowBook.from_arrays(path, ids, feats, grads, epochs, branches, tail)
            book.origin = origin
            return book.recorded()
        n = len(ids)
        counts = np.ones(n, np.int64) if tail is None else tail
        k = 1 if slots is None or slots.shape != (1,) else int(slots[0])
        ok = (ids.dtype == np.int64 and ids.ndim == 1 and feats.ndim == 3 and grads.ndim == 3
              and feats.shape[:2] == grads.shape[:2] and feats.shape[0] == n and epochs.shape == (n,)
              and branches.shape == (feats.shape[1],) and counts.shape == (n,) and bool(np.all(np.diff(ids) > 0))
              and k >= 1 and feats.shape[1] % k == 0 and bool(np.all((counts >= 1) & (counts <= k))))
        if not ok:
            raise PipelineError(f"{path}: recorded rows whose arrays do not agree (ids, feats, grads, epochs, "
                                "branches, counts); it was damaged or edited: select with select.proxies = fresh")
        return cls(ids, feats, grads, tuple(str(b) for b in branches), epochs.astype(np.int64),
                   counts.astype(np.int64), k, origin)

    def rows(self, positions: np.ndarray) -> HeadRows:
        """The rows of the samples at `positions`, as a proxy pass would give them (float32)."""
        f = torch.from_numpy(self.feats[positions].astype(np.float32))
        g = torch.from_numpy(self.grads[positions].astype(np.float32))
        return HeadRows([f[:, r] for r in range(f.shape[1])], [g[:, r] for r in range(g.shape[1])],
                        list(self.branches))

    def natural_features(self, positions: np.ndarray, branch: str) -> np.ndarray:
        """(len(positions), d) float16: the mean head input of the samples' rows on `branch` over their
        records (the encoder features of their natural views in the steps that recorded them)."""
        on = np.array([b == branch for b in self.branches])
        if not on.any():
            raise PipelineError(f"recorded rows have no row on branch {branch!r} (they have {self.branches})")
        rows_per = len(self.branches) // self.slots
        slot_of = np.arange(len(self.branches)) // rows_per
        mask = on[None, :] & (slot_of[None, :] < self.counts[positions, None])  # (m, S)
        f = self.feats[positions].astype(np.float32)
        total = np.einsum("ms,msd->md", mask.astype(np.float32), f)
        return (total / np.maximum(mask.sum(1, keepdims=True), 1)).astype(np.float16)


class RowBook:
    """The last `slots` records of rows of every pool sample, filled step by step (trainer side)."""

    def __init__(self, pool_ids: np.ndarray, slots: int = 1, origin: str | None = None):
        self.origin = origin  # the data set's fingerprint, sealed into the files it writes
        self.ids = np.sort(np.asarray(pool_ids, dtype=np.int64))
        self.slots = max(1, int(slots))
        self.feats = self.grads = None  # (n, K, R, d) and (n, K, R, p)
        self.epochs = np.full((len(self.ids), self.slots), -1, dtype=np.int64)  # -1: an empty slot
        self.visits = np.zeros(len(self.ids), dtype=np.int64)  # records written per sample (the next slot)
        self.branches: tuple = ()

    @property
    def latest(self) -> np.ndarray:
        """(n,) the epoch of each sample's newest record (-1: none)."""
        return self.epochs.max(1)

    def add(self, ids: np.ndarray, rows: HeadRows, epoch: int) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        ok = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == ids)
        f = torch.stack(rows.feats, 1).to(torch.float16).cpu().numpy()
        g = torch.stack(rows.grads, 1).float().cpu().numpy()
        if self.feats is None:
            self.feats = np.zeros((len(self.ids), self.slots, *f.shape[1:]), np.float16)
            self.grads = np.zeros((len(self.ids), self.slots, *g.shape[1:]), np.float32)
            self.branches = tuple(rows.branches)
        pos = pos[ok]
        slot = self.visits[pos] % self.slots
        self.feats[pos, slot], self.grads[pos, slot], self.epochs[pos, slot] = f[ok], g[ok], epoch
        self.visits[pos] += 1

    def recorded(self, since_epoch: int = 0, only_epochs=None) -> RecordedRows:
        """The records made at `since_epoch` or later (and in `only_epochs`, when given: the benchmark's
        disjoint halves), as a round reads them (samples with none left out)."""
        valid = self.epochs >= max(since_epoch, 0)
        if only_epochs is not None:
            valid &= np.isin(self.epochs, list(only_epochs))
        keep = valid.any(1)
        if self.feats is None or not keep.any():
            return RecordedRows(np.zeros(0, np.int64), np.zeros((0, 0, 0), np.float16),
                                np.zeros((0, 0, 0), np.float32), (), np.zeros(0, np.int64), origin=self.origin)
        valid = valid[keep]
        counts = valid.sum(1)
        n, k = len(counts), self.slots
        r = len(self.branches)
        if k == 1:
            feats, grads = self.feats[keep, 0], self.grads[keep, 0]
        else:  # valid records first, each gradient divided by the record count, the empty slots zeros
            order = np.argsort(~valid, axis=1, kind="stable")
            take = (np.flatnonzero(keep)[:, None], order)
            scale = (np.take_along_axis(valid, order, 1) / counts[:, None]).astype(np.float32)
            feats = (self.feats[take] * (scale > 0)[..., None, None]).astype(np.float16).reshape(n, k * r, -1)
            grads = (self.grads[take] * scale[..., None, None]).reshape(n, k * r, -1)
        latest = np.where(valid, self.epochs[keep], -1).max(1)
        return RecordedRows(self.ids[keep], feats, grads, self.branches * k, latest, counts.astype(np.int64), k,
                            self.origin)

    def save(self, path: str | Path) -> Path:
        """The whole book (ids, feats, grads, epochs, branches, visits), for an exact resume."""
        if self.feats is None:
            return self.recorded().save(path)
        return _write_sealed(path, (self.ids, self.feats, self.grads, self.epochs,
                                    np.array(self.branches, dtype=np.str_), self.visits), self.origin)

    @classmethod
    def from_arrays(cls, path, ids, feats, grads, epochs, branches, visits) -> "RowBook":
        n = len(ids)
        ok = (ids.dtype == np.int64 and ids.ndim == 1 and feats.ndim == 4 and grads.ndim == 4
              and feats.shape[:3] == grads.shape[:3] and feats.shape[0] == n and epochs.shape == feats.shape[:2]
              and branches.shape == (feats.shape[2],) and visits is not None and visits.shape == (n,)
              and bool(np.all(np.diff(ids) > 0)))
        if not ok:
            raise PipelineError(f"{path}: a book of recorded rows whose arrays do not agree (ids, feats, grads, "
                                "epochs, branches, visits); it was damaged or edited: select with "
                                "select.proxies = fresh")
        book = cls(ids, feats.shape[1])
        book.feats, book.grads = feats, grads.astype(np.float32, copy=False)
        book.epochs, book.visits = epochs.astype(np.int64), visits.astype(np.int64)
        book.branches = tuple(str(b) for b in branches)
        return book

    def load(self, path: str | Path) -> None:
        """Back to what `save` wrote (a resumed run records on from there). A book of as many slots is taken as
        it is; otherwise (another `select.row_epochs`, or rows of one record each) each sample's newest records
        are kept. Samples outside the pool are dropped; a file of no rows leaves the book empty."""
        with open(path, "rb") as f:
            try:
                arrays = _load_arrays(f, 6)
            except (OSError, ValueError) as exc:
                raise PipelineError(f"{path}: not a file of recorded selection rows ({exc}); start the run "
                                    "afresh or select with select.proxies = fresh") from None
            book = arrays[1] is not None and arrays[1].ndim == 4
            if book:
                _check_seal(path, f, self.origin)
        if book:
            _check_finite(path, arrays[1], arrays[2])
            saved = RowBook.from_arrays(path, *arrays)
            if saved.slots == self.slots and np.array_equal(saved.ids, self.ids):
                self.feats, self.grads, self.epochs, self.visits = saved.feats, saved.grads, saved.epochs, saved.visits
                self.branches = saved.branches
                return
            rows = saved.recorded()
        else:
            rows = RecordedRows.load(path, self.origin)
        if not len(rows.ids):
            return
        per = len(rows.branches) // rows.slots
        for s in range(rows.slots):  # oldest first, so that the newest end up latest
            have = np.flatnonzero(rows.counts > s)
            cols = slice(s * per, (s + 1) * per)
            part = HeadRows([torch.from_numpy(rows.feats[have, c].astype(np.float32)) for c in range(cols.start, cols.stop)],
                            [torch.from_numpy(rows.grads[have, c] * rows.counts[have, None])
                             for c in range(cols.start, cols.stop)], list(rows.branches[cols]))
            self.add(rows.ids[have], part, 0)
        pos = np.searchsorted(self.ids, rows.ids)
        ok = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == rows.ids)
        self.epochs[pos[ok]] = np.where(self.epochs[pos[ok]] >= 0, rows.epochs[ok, None], -1)

    @property
    def nbytes(self) -> int:
        return 0 if self.feats is None else self.feats.nbytes + self.grads.nbytes
