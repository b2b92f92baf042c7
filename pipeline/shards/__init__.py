"""Shard sets: preparing them from sources, reading them, subset manifests, loaders."""

from pipeline.shards.loaders import Batch, create_loader
from pipeline.shards.manifest import Manifest
from pipeline.shards.shardset import ShardSet

__all__ = ["Batch", "Manifest", "ShardSet", "create_loader"]
