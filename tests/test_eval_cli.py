"""``dinov2-hf eval`` on a converted stock-transformers checkpoint, and its input checks."""

import itertools
import json

import pytest
import torch
from conftest import randomize_
from eval_threads import single_thread  # noqa: F401  (autouse: one compute thread)

from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
from dinov2_hf.cli import main
from dinov2_hf.data.sources import DataSettings, load_image_stream
from dinov2_hf.eval.features import labelled_images
from dinov2_hf.eval.knn import knn_classify
from dinov2_hf.modeling.processor import dinov2_image_processor
from dinov2_hf.modeling.save import export_transformers

TRAIN = "train-00000-of-00005.parquet"
TEST = "test-00000-of-00001.parquet"


def test_eval_knn_on_an_exported_transformers_checkpoint(tmp_path, cifar_dir, tiny_kwargs):
    from transformers import Dinov2Model

    model = randomize_(Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs)), std=0.05)
    export_transformers(model, tmp_path / "stock")
    output = tmp_path / "knn.json"
    code = main(["eval", "knn", "--model", str(tmp_path / "stock"), "--dataset", str(cifar_dir / TRAIN),
                 "--test-dataset", str(cifar_dir / TEST), "--max-train", "120", "--max-test", "40", "--ks", "5", "20",
                 "--resize-size", "64", "--crop-size", "56", "--batch-size", "50", "--no-progress", "--output", str(output)])
    assert code == 0
    record = json.loads(output.read_text())
    assert record["dataset"]["train_images"] == 120 and record["dataset"]["test_images"] == 40
    # Reference: stock transformers' own Dinov2Model on the same images, same preprocessing.
    stock = Dinov2Model.from_pretrained(tmp_path / "stock").eval()
    processor = dinov2_image_processor(crop_size=56, resize_size=64)

    def stock_features(name, n):
        stream = load_image_stream(DataSettings(source=str(cifar_dir / name), split=name.split("-")[0], label_column="label", shuffle_buffer=0))
        pairs = list(itertools.islice(labelled_images(stream, "image", "label", {"skipped": 0}), n))
        with torch.no_grad():
            cls = stock(processor([p for p, _ in pairs], return_tensors="pt")["pixel_values"]).pooler_output
        return cls, torch.tensor([label for _, label in pairs])

    train, train_labels = stock_features(TRAIN, 120)
    test, test_labels = stock_features(TEST, 40)
    expected = knn_classify(train, train_labels, test, test_labels, ks=(5, 20))
    assert record["metrics"] == pytest.approx({f"top1_k{k}": v for k, v in expected.items()})


@pytest.mark.parametrize("extra, message", [
    (["--model", "./missing-folder"], "does not exist"),
    (["--label-column", "nope"], "--label-column 'nope' is not a column"),
    (["--label-column", ""], "needs labels"),
    (["--max-train", "0"], "--max-train must be a positive integer"),
    (["--max-image-pixels", "0"], "--max-image-pixels must be a positive integer"),
    (["--crop-size", "300"], "larger than --resize-size"),
])
def test_bad_arguments_fail_early_with_a_clear_message(tmp_path, capsys, cifar_dir, extra, message):
    args = ["eval", "knn", "--dataset", str(cifar_dir / TRAIN), "--test-dataset", str(cifar_dir / TEST),
            "--output", str(tmp_path / "r.json"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_local_dataset_needs_a_separate_test_set(tmp_path, capsys, cifar_dir):
    assert main(["eval", "knn", "--dataset", str(cifar_dir / TRAIN), "--output", str(tmp_path / "r.json")]) == 2
    assert "needs --test-dataset" in capsys.readouterr().err


def test_missing_dataset_and_unknown_task(tmp_path, capsys):
    assert main(["eval", "knn", "--dataset", str(tmp_path / "nowhere"), "--output", str(tmp_path / "r.json")]) == 2
    assert "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "segmentaton", "--dataset", "x"])
    assert "invalid choice: 'segmentaton'" in capsys.readouterr().err


def test_eval_retrieval_and_copy_detection(tmp_path, cifar_dir, tiny_kwargs):
    from dinov2_hf.modeling.save import save_ours

    # LayerScale 0.5 (not 1e-5): a fresh init's blocks barely touch the tokens, so all CLS would be nearly equal.
    torch.manual_seed(0)
    save_ours(Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs)), tmp_path / "model")
    # Queries are the first 8 database images themselves: each one's own entry must come first (mAP 1),
    # unless it is marked junk, in which case the next positive is what counts.
    ground_truth = [{"ok": [i], "junk": []} for i in range(8)]
    ground_truth[0] = {"ok": [0, 30], "junk": []}
    (tmp_path / "gnd.json").write_text(json.dumps(ground_truth))
    common = ["--model", str(tmp_path / "model"), "--dataset", str(cifar_dir / TEST), "--split", "test", "--no-progress",
              "--resize-size", "64", "--crop-size", "56"]
    args = ["eval", "retrieval", *common, "--max-train", "60", "--max-test", "8", "--ap", "standard",
            "--ground-truth", str(tmp_path / "gnd.json"), "--output", str(tmp_path / "retrieval.json")]
    assert main(args) == 0
    record = json.loads((tmp_path / "retrieval.json").read_text())
    # query 0: itself at rank 0, image 30 somewhere at rank r: AP = (1 + 2/(r+1)) / 2 < 1; all others: AP 1
    assert 7 / 8 < record["metrics"]["map"] < 1.0
    assert main(["eval", "copydetect", *common, "--max-train", "100", "--num-queries", "20",
                 "--output", str(tmp_path / "copy.json")]) == 0
    metrics = json.loads((tmp_path / "copy.json").read_text())["metrics"]
    assert set(metrics) == {"map", "recall@1", "recall@10"} and metrics["recall@10"] >= metrics["recall@1"] > 1 / 100


def test_retrieval_needs_a_ground_truth_file(tmp_path, capsys, cifar_dir):
    args = ["eval", "retrieval", "--dataset", str(cifar_dir / TEST), "--output", str(tmp_path / "r.json")]
    assert main(args) == 2
    assert "needs --ground-truth FILE" in capsys.readouterr().err
    (tmp_path / "gnd.json").write_text('{"easy": []}')
    assert main([*args, "--ground-truth", str(tmp_path / "gnd.json")]) == 2
    assert "expected a JSON list" in capsys.readouterr().err


def write_pasted_parquet(folder, cifar_dir, n_train=24, n_test=8):
    """A dense dataset as users have them: image + mask PNG columns and a float depth column, in parquet shards."""

    import datasets
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from dinov2_hf.eval.dense import pasted_objects

    stream = load_image_stream(DataSettings(source=str(cifar_dir / TEST), split="test", label_column="label", shuffle_buffer=0))
    objects = list(itertools.islice(labelled_images(stream, "image", "label", {"skipped": 0}), n_train + n_test))
    backgrounds = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    images, masks, depths = pasted_objects(objects, backgrounds, size=56, object_size=(20, 36), seed=0)
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                  "depth_map": datasets.Sequence(datasets.Sequence(datasets.Value("float32")))})
    for split, rows in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        data = {"image": images[rows], "annotation": [Image.fromarray((m > 0).numpy().astype("uint8"), mode="L") for m in masks[rows]],
                "depth_map": [d.tolist() for d in depths[rows]]}
        datasets.Dataset.from_dict(data, features=features).to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
    return masks, depths


def test_eval_segmentation_depth_and_figures(tmp_path, cifar_dir, tiny_kwargs):
    from dinov2_hf.modeling.save import save_ours

    data = tmp_path / "pasted"
    data.mkdir()
    write_pasted_parquet(data, cifar_dir)
    torch.manual_seed(0)
    save_ours(Dinov2HFModel(Dinov2HFConfig(**tiny_kwargs)), tmp_path / "model")
    common = ["--model", str(tmp_path / "model"), "--crop-size", "56", "--resize-size", "56", "--epochs", "2", "--no-progress"]
    train, test = str(data / "train-00000-of-00001.parquet"), str(data / "test-00000-of-00001.parquet")
    assert main(["eval", "segmentation", *common, "--dataset", train, "--test-dataset", test, "--num-classes", "2",
                 "--output", str(tmp_path / "seg.json"), "--model-card", str(tmp_path / "model" / "README.md"),
                 "--dataset-name", "pasted-cifar"]) == 0
    seg = json.loads((tmp_path / "seg.json").read_text())
    assert seg["dataset"]["train_images"] == 24 and seg["dataset"]["test_images"] == 8
    assert 0 <= seg["metrics"]["miou"] <= 1 and len(seg["metrics"]["per_class_iou"]) == 2
    assert main(["eval", "depth", *common, "--dataset", train, "--test-dataset", test, "--output", str(tmp_path / "depth.json"),
                 "--model-card", str(tmp_path / "model" / "README.md"), "--dataset-name", "pasted-cifar"]) == 0
    depth = json.loads((tmp_path / "depth.json").read_text())["metrics"]
    assert depth["rmse"] > 0 and 0 <= depth["delta1"] <= 1
    from huggingface_hub import ModelCard

    names = {e.metric_name for e in ModelCard.load(tmp_path / "model" / "README.md").data.eval_results}
    assert names == {"mIoU", "RMSE", "delta<1.25"}
    assert main(["eval", "visualize", *common, "--images", "china.jpg", "flower.jpg", "--output-dir", str(tmp_path / "figs"),
                 "--output", str(tmp_path / "figs.json")]) == 0
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == [
        "attention_000.png", "attention_001.png", "matches_000_001.png", "pca_000.png", "pca_001.png"]


@pytest.mark.parametrize("extra, message", [
    (["--mask-column", "seg"], "--mask-column 'seg' is not a column"),
    ([], "needs --num-classes"),
])
def test_segmentation_arguments_are_checked(tmp_path, capsys, cifar_dir, extra, message):
    args = ["eval", "segmentation", "--dataset", str(cifar_dir / TEST), "--split", "test", "--test-dataset", str(cifar_dir / TEST), "--output", str(tmp_path / "r.json"), *extra]
    if "--num-classes" not in extra and extra:
        args += ["--num-classes", "3"]
    assert main(args) == 2
    assert message in capsys.readouterr().err
