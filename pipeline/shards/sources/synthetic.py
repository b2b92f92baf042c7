"""`synthetic[:N]` - a seeded procedural data set of 10 shape/texture classes (32x32 RGB).

Built to exercise selectors: besides ordinary samples it holds near-duplicates (copies of an earlier sample
of the same class with faint noise, which a coreset should not pick twice) and hard cases (low contrast and
heavy noise). Which samples are which is recorded in `roles` for tests.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import PipelineError
from pipeline.shards.sources.base import ArraySource

CLASSES = ["disk", "square", "triangle", "ring", "cross", "hstripes", "vstripes", "checker", "diagonal", "dots"]
SIZE = 32
DEFAULT_COUNT = 2000
DUPLICATE_FRACTION = 0.15
HARD_FRACTION = 0.10
SEED = 20231


def _masks(kind: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean (n, 32, 32) masks, one per sample, of its class's shape at a random place, size and angle."""
    n = len(kind)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cx = rng.uniform(11, 21, n).astype(np.float32)[:, None, None]
    cy = rng.uniform(11, 21, n).astype(np.float32)[:, None, None]
    r = rng.uniform(6, 10, n).astype(np.float32)[:, None, None]
    th = rng.uniform(-0.5, 0.5, n).astype(np.float32)[:, None, None]
    period = rng.uniform(4, 8, n).astype(np.float32)[:, None, None]
    dx, dy = xx - cx, yy - cy
    u = dx * np.cos(th) + dy * np.sin(th)
    v = -dx * np.sin(th) + dy * np.cos(th)
    d = np.sqrt(dx * dx + dy * dy)
    ur, vr = xx * np.cos(th) + yy * np.sin(th), -xx * np.sin(th) + yy * np.cos(th)
    w = 2 * np.pi / period
    shapes = [
        d < r,
        np.maximum(np.abs(u), np.abs(v)) < r * 0.8,
        (v >= -r * 0.5) & (v <= r) & (np.abs(u) <= (r - v) * 0.6),
        np.abs(d - r) < 1.6,
        ((np.abs(u) < r / 3.5) & (np.abs(v) < r)) | ((np.abs(v) < r / 3.5) & (np.abs(u) < r)),
        np.sin(vr * w) > 0,
        np.sin(ur * w) > 0,
        np.sin(ur * w) * np.sin(vr * w) > 0,
        np.sin((ur + vr) * w / np.sqrt(2)) > 0,
        ((np.mod(ur, period) - period / 2) ** 2 + (np.mod(vr, period) - period / 2) ** 2) < (period / 4) ** 2,
    ]
    out = np.zeros((n, SIZE, SIZE), dtype=bool)
    for k, m in enumerate(shapes):
        sel = kind == k
        out[sel] = np.broadcast_to(m, (n, SIZE, SIZE))[sel]
    return out


def generate(count: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 (n,32,32,3), labels, roles) with roles 0 = ordinary, 1 = near-duplicate, 2 = hard."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), count)
    roles = np.zeros(count, dtype=np.int64)
    u = rng.random(count)
    roles[u < HARD_FRACTION] = 2
    roles[(u >= HARD_FRACTION) & (u < HARD_FRACTION + DUPLICATE_FRACTION)] = 1
    roles[0] = 0
    images = np.empty((count, SIZE, SIZE, 3), dtype=np.uint8)
    for start in range(0, count, 4096):
        sl = slice(start, min(count, start + 4096))
        n = sl.stop - sl.start
        masks = _masks(labels[sl], rng)[..., None]
        bg = rng.uniform(0, 255, (n, 1, 1, 3))
        hard = (roles[sl] == 2)[:, None, None, None]
        direction = rng.normal(size=(n, 1, 1, 3))
        direction /= np.linalg.norm(direction, axis=-1, keepdims=True) + 1e-8
        contrast = np.where(hard, rng.uniform(25, 45, (n, 1, 1, 1)), rng.uniform(90, 160, (n, 1, 1, 1)))
        fg = np.clip(bg + direction * contrast, 0, 255)
        fg = np.where(np.abs(fg - bg).sum(-1, keepdims=True) < contrast * 0.5, 255 - bg, fg)
        sigma = np.where(hard, 22.0, 6.0)
        pix = np.where(masks, fg, bg) + rng.normal(size=(n, SIZE, SIZE, 3)) * sigma
        images[sl] = np.clip(np.rint(pix), 0, 255).astype(np.uint8)
    # Near-duplicates: replace with a faintly perturbed copy of an earlier ordinary sample of the same class.
    for i in np.flatnonzero(roles == 1):
        earlier = np.flatnonzero((labels[:i] == labels[i]) & (roles[:i] == 0))
        if len(earlier) == 0:
            roles[i] = 0
            continue
        j = earlier[rng.integers(len(earlier))]
        noise = rng.normal(size=(SIZE, SIZE, 3)) * 3.0
        images[i] = np.clip(np.rint(images[j] + noise), 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64), roles


class SyntheticSource(ArraySource):
    native_splits = False

    def __init__(self, arg: str | None = None):
        super().__init__()
        try:
            count = int(arg) if arg else DEFAULT_COUNT
        except ValueError:
            raise PipelineError(f"synthetic:{arg}: N must be a whole number of images, e.g. synthetic:5000") from None
        if count < 10:
            raise PipelineError(f"synthetic:{count}: too few images; ask for at least 10")
        images, labels, self.roles = generate(count)
        self.name, self.mode, self.classes = f"synthetic-{count}", "RGB", list(CLASSES)
        self._set_split("train", images, labels)
