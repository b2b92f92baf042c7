"""Streaming data selection for affordable adversarially robust pre-training."""

__version__ = "0.1.0"
