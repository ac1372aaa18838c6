"""Instance retrieval on frozen features: mAP with Oxford / Paris style ground truth, and copy detection.

Ground truth is one dict per query with database indices under ``"easy"``, ``"hard"`` and ``"junk"``
(the revisited Oxford/Paris format, Radenovic et al. 2018) or ``"ok"`` (positives) and ``"junk"``.
The revisited protocol scores three setups: *easy* (positives: easy; ignored: junk and hard),
*medium* (positives: easy and hard; ignored: junk) and *hard* (positives: hard; ignored: junk and
easy). Ignored images are removed from the ranking; queries without positives are left out of the mean.

Average precision: ``"standard"`` is the area under the non-interpolated precision-recall curve
(scikit-learn's ``average_precision_score``); ``"oxford"`` is the trapezoidal rule of the Oxford
benchmark code, with which the published ROxford / RParis numbers are computed.

Copy detection: :func:`make_copy_queries` builds queries from any image set by strong
augmentation (crop, flip, rotation, color, grayscale, blur, occluding box, JPEG); each query's only
positive is the database image it came from (mAP and recall@1 over the whole database).
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from .similarity import cosine_blocks, topk_cosine

PROTOCOLS = {  # setup: (positive lists, ignored lists)
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def cosine_ranking(queries: torch.Tensor, database: torch.Tensor, chunk_size: int = 1024) -> np.ndarray:
    """(n_queries, n_database) database indices sorted by decreasing cosine similarity."""
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"features must be (n, dim) with the same dim; got {tuple(queries.shape)} and {tuple(database.shape)}.")
    # a top-k with k = the whole database, over the whole database at once (one product and one stable sort),
    # called per query chunk so that only the ranking, gathered on the CPU, grows with the queries
    everything = max(1, len(database))
    chunks = [topk_cosine(queries[start : start + chunk_size], database, everything, everything)[1].cpu().numpy()
              for start in range(0, len(queries), chunk_size)]
    return np.concatenate(chunks)


def average_precision(positive_ranks: np.ndarray, n_positives: int, mode: str = "standard") -> float:
    """AP from the sorted 0-based ranks of the positives in a ranking (ignored images already removed)."""
    if n_positives == 0:
        return float("nan")
    ranks = np.sort(np.asarray(positive_ranks, dtype=np.float64))
    found = np.arange(1, len(ranks) + 1)
    if mode == "standard":
        return float(np.sum(found / (ranks + 1)) / n_positives)
    if mode == "oxford":
        # Mean of the precision just before and at each positive, with precision 1 before rank 0.
        before = np.where(ranks == 0, 1.0, (found - 1) / np.maximum(ranks, 1))
        return float(np.sum((before + found / (ranks + 1)) / 2) / n_positives)
    raise ValueError(f"unknown AP mode {mode!r}; use 'standard' or 'oxford'.")


def _query_ap(ranking: np.ndarray, positives: Sequence[int], ignored: Sequence[int], mode: str) -> float:
    positives = np.asarray(sorted(set(positives)), dtype=np.int64)
    keep = ~np.isin(ranking, np.asarray(list(ignored), dtype=np.int64))
    kept = ranking[keep]
    return average_precision(np.flatnonzero(np.isin(kept, positives)), len(positives), mode)


def mean_average_precision(
    ranking: np.ndarray, ground_truth: Sequence[dict], mode: str = "oxford", protocols: Sequence[str] | None = None
) -> dict[str, float]:
    """mAP of a ranking (from :func:`cosine_ranking`) against per-query ground truth.

    With ``easy``/``hard`` lists: one mAP per revisited setup (``protocols``, default all three
    present); with ``ok`` lists: ``{"map": ...}``.
    """
    if len(ranking) != len(ground_truth):
        raise ValueError(f"{len(ranking)} ranked queries but {len(ground_truth)} ground-truth entries; they must match.")
    if not ground_truth:
        raise ValueError("the ground truth is empty.")
    revisited = any("easy" in g or "hard" in g for g in ground_truth)
    if not revisited and not all("ok" in g for g in ground_truth):
        raise ValueError('each ground-truth entry needs "ok" (positives) or "easy"/"hard" lists, with optional "junk".')
    if revisited:
        setups = {name: PROTOCOLS[name] for name in (protocols or PROTOCOLS)}
    else:
        setups = {"map": (("ok",), ("junk",))}
    results = {}
    for name, (positive_keys, ignored_keys) in setups.items():
        aps = [
            _query_ap(row, [i for key in positive_keys for i in g.get(key, [])], [i for key in ignored_keys for i in g.get(key, [])], mode)
            for row, g in zip(ranking, ground_truth)
        ]
        valid = [ap for ap in aps if not np.isnan(ap)]
        if not valid:
            raise ValueError(f"no query has positives under the {name!r} setup; check the ground-truth indices.")
        results[name] = float(np.mean(valid))
    return results


def strong_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """A copy-detection style edit of ``image``: the kind of change a re-uploaded copy shows."""
    width, height = image.size
    scale, ratio = rng.uniform(0.4, 1.0), np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w = min(width, max(1, round((scale * width * height * ratio) ** 0.5)))
    h = min(height, max(1, round((scale * width * height / ratio) ** 0.5)))
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    image = image.crop((left, top, left + w, top + h)).resize((width, height), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    if rng.random() < 0.5:
        image = image.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.2:
        image = ImageOps.grayscale(image).convert("RGB")
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.1, 1.5) * max(width, height) / 224))
    if rng.random() < 0.5:  # an occluding box (a sticker, a caption band)
        bw, bh = rng.randint(width // 8, width // 3), rng.randint(height // 8, height // 3)
        x, y = rng.randint(0, width - bw), rng.randint(0, height - bh)
        image = image.copy()
        image.paste(tuple(rng.randint(0, 255) for _ in range(3)), (x, y, x + bw, y + bh))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(20, 70))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def make_copy_queries(images: Sequence[Image.Image], num_queries: int, seed: int = 0) -> tuple[list[Image.Image], list[int]]:
    """``num_queries`` strongly augmented copies of distinct database images, and the index each came from."""
    if not 0 < num_queries <= len(images):
        raise ValueError(f"num_queries must be in 1..{len(images)} (the database size); got {num_queries}.")
    rng = random.Random(seed)
    sources = sorted(rng.sample(range(len(images)), num_queries))
    return [strong_augment(images[i], rng) for i in sources], sources


def copy_detection_metrics(
    query_features: torch.Tensor, database_features: torch.Tensor, sources: Sequence[int], chunk_size: int = 1024
) -> dict[str, float]:
    """mAP (one positive per query: 1 / its rank) and recall@1 / @10 of copies against their database originals.

    A query's rank is the number of database images strictly more similar than its source (no
    full sort: memory stays at one ``chunk_size x database`` similarity block).
    """
    if query_features.ndim != 2 or database_features.ndim != 2 or query_features.shape[1] != database_features.shape[1]:
        raise ValueError(f"features must be (n, dim) with the same dim; got {tuple(query_features.shape)} and {tuple(database_features.shape)}.")
    if len(sources) != len(query_features):
        raise ValueError(f"{len(query_features)} queries but {len(sources)} source indices.")
    sources_t = torch.as_tensor(list(sources), dtype=torch.long)
    ranks = []
    # whole database rows per block: the source's similarity must come from the same product it is compared in
    blocks = cosine_blocks(query_features, database_features, chunk_size, len(database_features))
    for start, _, similarity in blocks:
        own = similarity.gather(1, sources_t[start : start + chunk_size, None].to(similarity.device))
        ranks.append((similarity > own).sum(1).cpu())
    ranks = torch.cat(ranks).double()
    return {"map": (1 / (ranks + 1)).mean().item(), "recall@1": (ranks < 1).double().mean().item(),
            "recall@10": (ranks < 10).double().mean().item()}
