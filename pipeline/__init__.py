"""Streaming data selection for affordable adversarially robust pre-training."""

from pipeline.runtime import prepare_threads as _prepare_threads

__version__ = "0.1.0"

THREADS = _prepare_threads()  # before anything imports torch (runtime.prepare_threads says why)
