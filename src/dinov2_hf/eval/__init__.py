"""Evaluation on frozen features: kNN, linear probes, logistic regression (retrieval and dense tasks follow)."""

from .features import Features, dataset_features, extract_features
from .knn import knn_classify, knn_predict, topk_cosine
from .linear import linear_probe, logistic_regression

__all__ = [
    "Features",
    "dataset_features",
    "extract_features",
    "knn_classify",
    "knn_predict",
    "linear_probe",
    "logistic_regression",
    "topk_cosine",
]
