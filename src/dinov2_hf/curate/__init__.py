"""LVD-142M-style data curation: embed, deduplicate, retrieve, cluster-balance, write streamable shards.

One module per stage: :mod:`.embed`, :mod:`.dedup`, :mod:`.retrieve`, :mod:`.kmeans` and
:mod:`.sampling`, :mod:`.write`; :mod:`.pipeline` runs them (each resumable) from a
:class:`CurateConfig`; :mod:`dinov2_hf.cli.curate` is ``dinov2-hf curate``.
"""

from importlib import import_module

# Imported on first use, so that `dinov2-hf --help` and the other subcommands do not load faiss.
_EXPORTS = {
    "CurateConfig": "config", "load_curate_config": "config",
    "deduplicate": "dedup", "near_duplicate_pairs": "dedup",
    "BackboneEmbedder": "embed", "embed_source": "embed", "load_embeddings": "embed",
    "ClusterTree": "kmeans", "hierarchical_kmeans": "kmeans",
    "CurationResult": "pipeline", "run_curation": "pipeline",
    "retrieve": "retrieve",
    "balanced_sample": "sampling", "split_evenly": "sampling",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BackboneEmbedder",
    "ClusterTree",
    "CurateConfig",
    "CurationResult",
    "balanced_sample",
    "deduplicate",
    "embed_source",
    "hierarchical_kmeans",
    "load_curate_config",
    "load_embeddings",
    "near_duplicate_pairs",
    "retrieve",
    "run_curation",
    "split_evenly",
]
