"""Depth estimation errors: RMSE, log-RMSE, abs-rel, delta<1.25 over valid pixels (dinov2_hf.eval.dense.depth_metrics)."""

import datasets
import evaluate
import numpy as np
import torch

from dinov2_hf.eval.dense import depth_metrics

_DESCRIPTION = "Depth errors over pixels whose reference depth is > 0."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of 2-d float arrays): predicted depth maps.
    references (list of 2-d float arrays): ground-truth depth maps (<= 0: invalid).
Returns:
    rmse, log_rmse, abs_rel, delta1 (floats).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DepthError(evaluate.Metric):
    def _info(self):
        maps = datasets.Sequence(datasets.Sequence(datasets.Value("float32")))
        return evaluate.MetricInfo(description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
                                   features=datasets.Features({"predictions": maps, "references": maps}))

    def _compute(self, predictions, references):
        predictions = torch.cat([torch.as_tensor(np.asarray(p, dtype=np.float32)).flatten() for p in predictions])
        references = torch.cat([torch.as_tensor(np.asarray(r, dtype=np.float32)).flatten() for r in references])
        return depth_metrics(predictions, references)
