"""Shard sets: preparing them from sources, reading them, subset manifests, loaders.

Exports resolve lazily, so that `pipeline prepare` or an error message does not pay for importing torch.
"""

_EXPORTS = {
    "Batch": "pipeline.shards.batch",
    "create_loader": "pipeline.shards.loaders",
    "Manifest": "pipeline.shards.manifest",
    "ShardSet": "pipeline.shards.shardset",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)


__all__ = list(_EXPORTS)
