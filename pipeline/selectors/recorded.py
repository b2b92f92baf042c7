"""Rows recorded by training (`select.proxies = recorded`): what a proxy pass would compute, taken from the
steps that already ran.

During training the trainer keeps, for every sample it trains on, the selection head's inputs of the sample's
rows in the step's forward and each row's loss gradient at the head output (the method's `rows_from_step`, the
head in eval mode, so that a row passes it on its own as in the proxies), by sample id: head inputs float16,
gradients float32 (they are small numbers). The latest record of each sample wins. At a selection point the
rows are written beside the round's snapshot (RUN/snapshots/round-NNNN.rows) and the round computes fresh
rows only for the candidates without a record (or with one older than `select.row_age` epochs) and for U.

The approximation: rows come from the model as it was at that step (it moved during the epoch, and more for
older records), from the training attack and augmentation (not the proxies' 1-step attack), and from encoder
features in train mode (batch statistics); the head gradients are taken at the head of that step. Memory: a
sample keeps R rows of a feature (2 bytes per value) and a head-output gradient (4 bytes per value): ACL's 4
rows at ResNet-18 (512, 128) are 6.1 kB, 6.1 GB per million samples (the book is saved with each checkpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.atomic import atomic_path
from pipeline.errors import PipelineError
from pipeline.objectives import HeadRows


@dataclass
class RecordedRows:
    ids: np.ndarray  # (n,) sorted sample ids
    feats: np.ndarray  # (n, R, d) float16 head inputs
    grads: np.ndarray  # (n, R, p) float32 loss gradients at the head output (small: float16 would lose them)
    branches: tuple  # the batch-norm branch of each of the R rows
    epochs: np.ndarray  # (n,) the epoch (0-based) each sample's rows were recorded in

    def save(self, path: str | Path) -> Path:
        """Five .npy arrays one after another in one file (ids, feats, grads, epochs, branches): no zip
        container, whose checksums made np.savez 6x slower for a book saved every epoch."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            for a in (self.ids, self.feats, self.grads, self.epochs, np.array(self.branches, dtype=np.str_)):
                np.save(f, a, allow_pickle=False)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "RecordedRows":
        """Validated: plain arrays only (no pickles), shapes that agree, sorted unique ids."""
        try:
            with open(path, "rb") as f:
                ids, feats, grads, epochs, branches = (np.load(f, allow_pickle=False) for _ in range(5))
        except (OSError, ValueError, EOFError) as exc:
            raise PipelineError(f"{path}: not a file of recorded selection rows ({exc}); select with "
                                "select.proxies = fresh, or record it again") from None
        n = len(ids)
        ok = (ids.dtype == np.int64 and ids.ndim == 1 and feats.ndim == 3 and grads.ndim == 3
              and feats.shape[:2] == grads.shape[:2] and feats.shape[0] == n and epochs.shape == (n,)
              and branches.shape == (feats.shape[1],) and bool(np.all(np.diff(ids) > 0)))
        if not ok:
            raise PipelineError(f"{path}: recorded rows whose arrays do not agree (ids, feats, grads, epochs, "
                                "branches); it was damaged or edited: select with select.proxies = fresh")
        return cls(ids, feats, grads, tuple(str(b) for b in branches), epochs.astype(np.int64))

    def rows(self, positions: np.ndarray) -> HeadRows:
        """The rows of the samples at `positions`, as a proxy pass would give them (float32)."""
        f = torch.from_numpy(self.feats[positions].astype(np.float32))
        g = torch.from_numpy(self.grads[positions].astype(np.float32))
        return HeadRows([f[:, r] for r in range(f.shape[1])], [g[:, r] for r in range(g.shape[1])],
                        list(self.branches))


class RowBook:
    """The latest rows of every pool sample, filled step by step (trainer side)."""

    def __init__(self, pool_ids: np.ndarray):
        self.ids = np.sort(np.asarray(pool_ids, dtype=np.int64))
        self.feats = self.grads = None
        self.epochs = np.full(len(self.ids), -1, dtype=np.int64)
        self.branches: tuple = ()

    def add(self, ids: np.ndarray, rows: HeadRows, epoch: int) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, ids)
        ok = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == ids)
        f = torch.stack(rows.feats, 1).to(torch.float16).cpu().numpy()
        g = torch.stack(rows.grads, 1).float().cpu().numpy()
        if self.feats is None:
            self.feats = np.zeros((len(self.ids), *f.shape[1:]), np.float16)
            self.grads = np.zeros((len(self.ids), *g.shape[1:]), np.float32)
            self.branches = tuple(rows.branches)
        self.feats[pos[ok]], self.grads[pos[ok]], self.epochs[pos[ok]] = f[ok], g[ok], epoch

    def recorded(self, since_epoch: int = 0) -> RecordedRows:
        """The samples recorded at `since_epoch` or later."""
        keep = self.epochs >= max(since_epoch, 0)
        if self.feats is None:
            return RecordedRows(np.zeros(0, np.int64), np.zeros((0, 0, 0), np.float16),
                                np.zeros((0, 0, 0), np.float32), (), np.zeros(0, np.int64))
        return RecordedRows(self.ids[keep], self.feats[keep], self.grads[keep], self.branches, self.epochs[keep])

    def save(self, path: str | Path) -> Path:
        if self.feats is None:
            return self.recorded().save(path)
        return RecordedRows(self.ids, self.feats, self.grads, self.branches, self.epochs).save(path)

    def load(self, path: str | Path) -> None:
        """Back to what `save` wrote (a resumed run records on from there); samples outside the pool are
        dropped, a file of no rows leaves the book empty."""
        saved = RecordedRows.load(path)
        if not len(saved.ids):
            return
        keep = saved.epochs >= 0
        self.add(saved.ids[keep], saved.rows(np.flatnonzero(keep)), 0)
        pos = np.searchsorted(self.ids, saved.ids[keep])
        ok = (pos < len(self.ids)) & (self.ids[np.minimum(pos, len(self.ids) - 1)] == saved.ids[keep])
        self.epochs[pos[ok]] = saved.epochs[keep][ok]

    @property
    def nbytes(self) -> int:
        return 0 if self.feats is None else self.feats.nbytes + self.grads.nbytes
