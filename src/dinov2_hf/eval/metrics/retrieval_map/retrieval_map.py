"""Retrieval mean average precision of ranked database indices (dinov2_hf.eval.retrieval)."""

import datasets
import evaluate
import numpy as np

from dinov2_hf.eval.retrieval import mean_average_precision

_DESCRIPTION = "Mean average precision of per-query rankings; junk images are removed from the ranking."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int lists): per query, database indices from most to least similar.
    references (list of dicts): per query, {"positives": [...], "junk": [...]} database indices.
    mode (str): "standard" (non-interpolated, as scikit-learn) or "oxford" (trapezoidal), default "standard".
Returns:
    map (float).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalMAP(evaluate.Metric):
    def _info(self):
        indices = datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": indices, "references": {"positives": indices, "junk": indices}}),
        )

    def _compute(self, predictions, references, mode="standard"):
        ground_truth = [{"ok": r["positives"], "junk": r["junk"]} for r in references]
        return mean_average_precision(np.asarray(predictions), ground_truth, mode=mode)
