"""Semantic segmentation mIoU, per-class IoU and pixel accuracy (dinov2_hf.eval.dense.segmentation_metrics)."""

import datasets
import evaluate
import numpy as np
import torch

from dinov2_hf.eval.dense import IGNORE_INDEX, segmentation_metrics

_DESCRIPTION = "Mean intersection-over-union over classes present in prediction or ground truth, from one confusion matrix."
_KWARGS_DESCRIPTION = f"""
Args:
    predictions (list of 2-d int arrays): predicted class maps.
    references (list of 2-d int arrays): ground-truth class maps ({IGNORE_INDEX} = ignored).
    num_classes (int): number of classes.
Returns:
    miou (float), per_class_iou (list, None for absent classes), pixel_accuracy (float).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        maps = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
                                   features=datasets.Features({"predictions": maps, "references": maps}))

    def _compute(self, predictions, references, num_classes):
        predictions = torch.cat([torch.as_tensor(np.asarray(p)).flatten() for p in predictions])
        references = torch.cat([torch.as_tensor(np.asarray(r)).flatten() for r in references])
        return segmentation_metrics(predictions, references, num_classes)
