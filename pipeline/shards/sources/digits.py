"""`digits` - scikit-learn's bundled handwritten digits (1,797 real 8x8 images; no download)."""

from __future__ import annotations

import numpy as np

from pipeline.shards.sources.base import ArraySource


class DigitsSource(ArraySource):
    native_splits = False

    def __init__(self, arg: str | None = None):
        super().__init__()
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are 0..16 counts of set bits; spread them over 0..255.
        images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
        self.name, self.mode = "digits", "L"
        self.classes = [str(int(c)) for c in digits.target_names]
        self._set_split("train", images, digits.target)
