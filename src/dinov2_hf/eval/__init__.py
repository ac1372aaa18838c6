"""Evaluation on frozen features (kNN so far; linear probes, retrieval and dense tasks follow)."""

from .knn import knn_classify

__all__ = ["knn_classify"]
