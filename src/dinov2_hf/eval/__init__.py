"""Evaluation on frozen features with the DINOv2 paper's protocols (``dinov2-hf eval``).

features: batched extraction (last blocks' CLS, mean patch token, patch maps); similarity: chunked
cosine search (blocks, top-k); knn: weighted kNN; linear: many linear heads at once, logistic
regression; retrieval: mAP (revisited Oxford/Paris), copy detection; dense: linear segmentation and
depth heads; visualize: PCA maps, patch matches, CLS attention; metrics: ``evaluate`` modules loaded
from a local path; results: JSON and model-index.
"""

from .dense import depth_metrics, segmentation_metrics, train_depth_head, train_segmentation_head
from .features import Features, dataset_features, extract_features
from .knn import knn_classify, knn_predict
from .linear import linear_probe, logistic_regression
from .results import update_model_card, write_results
from .retrieval import copy_detection_metrics, cosine_ranking, make_copy_queries, mean_average_precision
from .similarity import cosine_blocks, topk_cosine
from .visualize import cls_attention_maps, match_patches, pca_rgb, save_figures

__all__ = [
    "Features",
    "cls_attention_maps",
    "copy_detection_metrics",
    "cosine_blocks",
    "cosine_ranking",
    "dataset_features",
    "depth_metrics",
    "extract_features",
    "knn_classify",
    "knn_predict",
    "linear_probe",
    "logistic_regression",
    "make_copy_queries",
    "match_patches",
    "mean_average_precision",
    "pca_rgb",
    "save_figures",
    "segmentation_metrics",
    "topk_cosine",
    "train_depth_head",
    "train_segmentation_head",
    "update_model_card",
    "write_results",
]
