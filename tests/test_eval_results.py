"""Results JSON and model-index entries that huggingface_hub reads back."""

import json

from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)
from huggingface_hub import ModelCard

from dinov2_hf.eval.results import update_model_card, write_results


def test_results_land_in_a_model_card_and_are_replaced_on_rerun(tmp_path):
    knn = write_results(tmp_path / "knn.json", "knn", {"top1_k10": 0.5, "top1_k20": 0.625},
                        model="m", dataset={"train": "cifar10 [train]", "test": "cifar10 [test]"})
    assert json.loads((tmp_path / "knn.json").read_text())["metrics"]["top1_k20"] == 0.625
    linear = {"task": "linear", "metrics": {"top1": 0.7, "best": {}, "heads": {}}, "dataset": {"test": "cifar10 [test]"}}
    update_model_card(tmp_path / "README.md", [knn, linear], model_name="tiny-dinov2", dataset_name="cifar10")
    card = ModelCard.load(tmp_path / "README.md")
    values = {(e.metric_name, e.dataset_split): e.metric_value for e in card.data.eval_results}
    assert values == {("kNN top-1 (k=10)", "test"): 0.5, ("kNN top-1 (k=20)", "test"): 0.625, ("Linear probe top-1", "test"): 0.7}
    assert card.data.eval_results[0].task_type == "image-classification"
    assert "model-index" in (tmp_path / "README.md").read_text()
    # a rerun replaces its own entries and keeps the others
    linear["metrics"]["top1"] = 0.75
    update_model_card(tmp_path / "README.md", [linear], model_name="tiny-dinov2", dataset_name="cifar10")
    card = ModelCard.load(tmp_path / "README.md")
    values = {e.metric_name: e.metric_value for e in card.data.eval_results}
    assert values["Linear probe top-1"] == 0.75 and values["kNN top-1 (k=20)"] == 0.625 and len(card.data.eval_results) == 3
