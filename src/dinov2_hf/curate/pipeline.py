"""The curation pipeline: embed -> deduplicate -> retrieve -> cluster -> sample -> write.

Each stage stores its result under ``<output_dir>/work`` with the parameters that produced it
(those of every earlier stage included); a rerun reuses a stage whose parameters are unchanged and
recomputes it, and every later stage, otherwise. Embedding resumes shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config_utils import to_dict
from .config import CurateConfig
from .dedup import copies_of, deduplicate
from .embed import BackboneEmbedder, Embeddings, embed_source, iter_rows
from .kmeans import ClusterTree, hierarchical_kmeans
from .retrieve import retrieve
from .sampling import balanced_sample
from .write import SourceSelection, write_card, write_dataset


def _stage(path: Path, parameters: dict, compute: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Load a stage's arrays when its stored parameters match, else compute and store them atomically."""
    key = json.dumps(parameters, sort_keys=True, default=str)
    if path.is_file():
        with np.load(path) as data:
            if str(data["_parameters"]) == key:
                return {name: data[name] for name in data.files if name != "_parameters"}
    arrays = compute()
    temporary = path.with_name(path.name + ".tmp.npz")
    np.savez(temporary, _parameters=np.array(key), **arrays)
    os.replace(temporary, path)
    return arrays


def _check_sources(config: CurateConfig) -> None:
    """Open every source (reading one row) before any model is loaded, so bad paths fail in seconds."""
    sources = [("pool", config.pool)] + ([("curated", config.curated)] if config.curated else [])
    sources += [(f"eval_sets[{i}]", s) for i, s in enumerate(config.eval_sets)]
    for name, settings in sources:
        try:
            next(iter_rows(settings), None)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"{name}: {str(error).replace('data.', f'{name}.')}") from error
        except ConnectionError as error:  # a Hub id that cannot be reached (offline, typo, private)
            raise RuntimeError(f"{name}.source={settings.source!r}: {error}. Check the dataset id, the network "
                               "and HF_HUB_OFFLINE, or give a local folder / parquet files.") from error


def _write_once(selections: list[SourceSelection], output_dir: Path, work: Path, parameters: dict) -> dict:
    """Write the dataset unless the same selection with the same parameters was already written."""
    digest = hashlib.sha256()
    for selection in selections:
        digest.update(selection.name.encode())
        digest.update(np.ascontiguousarray(selection.positions, dtype=np.int64).tobytes())
    key = json.dumps({**parameters, "selection": digest.hexdigest()}, sort_keys=True, default=str)
    marker = work / "written.json"
    if marker.is_file() and (output_dir / "data").is_dir():
        previous = json.loads(marker.read_text())
        if previous["key"] == key and all(Path(p).is_file() for p in previous["result"]["shards"]):
            return previous["result"]
    result = write_dataset(selections, output_dir, parameters["shard_size_mb"])
    marker.write_text(json.dumps({"key": key, "result": result}))
    return result


@dataclass
class CurationResult:
    counts: dict[str, int]
    output_dir: Path
    shards: list[str]
    manifest: str
    card: Path


def run_curation(config: CurateConfig, embedder: Callable | None = None) -> CurationResult:
    """Run (or resume) every stage of ``config``; ``embedder`` overrides ``config.embed`` (tests, custom models).

    A custom ``embedder`` maps a list of RGB PIL images to an (n, d) array of L2-normalised rows
    and has a ``signature`` string naming it.
    """
    config.validate()
    if embedder is None and config.embed.model is not None:
        from ..modeling.loading import check_backbone_source

        check_backbone_source(config.embed.model, "embed.model=")  # a typo fails now, not when the first batch loads it
    _check_sources(config)
    output_dir = Path(config.output.output_dir)
    work = output_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    if embedder is None:
        embedder = BackboneEmbedder(config.embed, config.seed)
    signature = getattr(embedder, "signature", type(embedder).__name__)

    def embed(name: str, settings) -> Embeddings:
        return embed_source(settings, embedder, work / "embeddings" / name, signature,
                            config.embed.shard_size, config.embed.batch_size, desc=f"embed {name}",
                            num_workers=config.embed.num_workers)

    pool = embed("pool", config.pool)
    curated = embed("curated", config.curated) if config.curated else None
    evals = [embed(f"eval{i}", settings) for i, settings in enumerate(config.eval_sets)]
    counts = {"pool rows": pool.rows, "pool undecodable": pool.skipped}
    if not len(pool.vectors):
        raise ValueError(f"pool.source={config.pool.source!r}: none of its {pool.rows} rows is a readable image.")

    parameters = {"embedder": signature, "pool": to_dict(config.pool), "evals": [to_dict(e) for e in config.eval_sets],
                  "dedup": to_dict(config.dedup), "index": to_dict(config.index), "seed": config.seed}
    eval_vectors = np.concatenate([e.vectors for e in evals]) if evals else None
    eval_hashes = np.concatenate([e.hashes for e in evals]) if evals else None

    def run_dedup():
        result = deduplicate(pool.vectors, pool.hashes, config.dedup, eval_vectors, eval_hashes, config.index, config.seed)
        return {"keep": result.keep, "removed": np.array([result.exact, result.near, result.leaked])}

    dedup = _stage(work / "dedup.npz", parameters, run_dedup)
    exact, near, leaked = (int(v) for v in dedup["removed"])
    candidates = np.flatnonzero(dedup["keep"])  # rows of pool.vectors
    counts.update({"exact duplicates removed": exact, "near duplicates removed": near,
                   "eval-set copies removed": leaked, "after dedup": len(candidates)})
    provenance = {}

    if curated is not None and len(curated.vectors) and len(candidates):
        include = config.output.include_curated
        parameters = {**parameters, "curated": to_dict(config.curated), "retrieve": to_dict(config.retrieve),
                      "include_curated": include}

        def run_retrieve():
            # Curated images are written themselves: their copies in the pool would be duplicates.
            copies = (copies_of(pool.vectors[candidates], pool.hashes[candidates], curated.vectors, curated.hashes,
                                config.dedup.threshold, config.index, config.seed, desc="dedup: curated",
                                nprobe=config.dedup.nprobe)
                      if include else np.zeros(len(candidates), dtype=bool))
            rest = np.flatnonzero(~copies)
            rows, queries, similarities = retrieve(pool.vectors[candidates[rest]], curated.vectors, config.retrieve.k,
                                                   config.index, config.seed).selected()
            return {"rows": rest[rows], "queries": queries, "similarities": similarities, "copies": np.array(copies.sum())}

        found = _stage(work / "retrieve.npz", parameters, run_retrieve)
        if include:
            counts["curated copies removed"] = int(found["copies"])
        candidates = candidates[found["rows"]]
        provenance["retrieved_for"] = curated.positions[found["queries"]]
        provenance["similarity"] = found["similarities"].astype(np.float64)
        counts["retrieved"] = len(candidates)

    target = config.sample.target_size
    leaf = np.full(len(candidates), -1, dtype=np.int64)
    if target and target < len(candidates):
        parameters = {**parameters, "cluster": to_dict(config.cluster)}
        cluster = config.cluster

        def run_cluster():
            return hierarchical_kmeans(pool.vectors[candidates], cluster.levels, cluster.resampling_steps,
                                       cluster.sample_sizes, cluster.iterations, config.seed,
                                       cluster.max_points_per_centroid).to_arrays()

        tree = ClusterTree.from_arrays(_stage(work / "clusters.npz", parameters, run_cluster))
        leaf = tree.parents[0]
        parameters = {**parameters, "sample": to_dict(config.sample)}
        chosen = _stage(work / "sample.npz", parameters,
                        lambda: {"chosen": balanced_sample(tree, target, config.sample.strategy, config.seed)})["chosen"]
        candidates, leaf = candidates[chosen], leaf[chosen]
        provenance = {key: value[chosen] for key, value in provenance.items()}
        counts["sampled"] = len(candidates)
    provenance["cluster"] = leaf

    order = np.argsort(pool.positions[candidates], kind="stable")
    selections = [SourceSelection("pool", config.pool, pool.positions[candidates][order],
                                  {key: value[order] for key, value in provenance.items()})]
    if curated is not None and config.output.include_curated:
        selections.insert(0, SourceSelection("curated", config.curated, curated.positions))
        counts["curated written"] = len(curated.positions)
    written = _write_once(selections, output_dir, work, {**parameters, "include_curated": config.output.include_curated,
                                                         "shard_size_mb": config.output.shard_size_mb})
    counts["written"] = written["images"]
    sources = {"pool": config.pool.source}
    if config.curated:
        sources["curated"] = config.curated.source
    sources.update({f"eval{i}": s.source for i, s in enumerate(config.eval_sets)})
    card = write_card(output_dir, config.output.name or output_dir.resolve().name, counts, sources,
                      {**config.to_dict(), "embedder": signature})
    return CurationResult(counts=counts, output_dir=output_dir, shards=written["shards"], manifest=written["manifest"], card=card)
