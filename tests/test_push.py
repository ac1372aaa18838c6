"""Hub publishing end to end against a fake Hub behind huggingface_hub's own HTTP client (tests/fake_hub.py):
the repo, revision, files and commit message sent; the uploaded folder loads with stock transformers and gives
the source model's features; the card parses and its model-index round-trips; failures leave the source intact."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_hub import fake_hub
from PIL import Image
from safetensors.torch import load_file
from test_trainer import tiny_config, write_cifar_subset

from dinov2_hf.config_utils import ConfigError
from dinov2_hf.eval.results import write_results
from dinov2_hf.hub import push_checkpoint, push_dataset

STOCK_FILES = {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "pca_features.png"}
OURS_FILES = {"config.json", "configuration_dinov2_hf.py", "heads.safetensors", "model.safetensors", "modeling_dinov2_hf.py",
              "preprocessor_config.json", "train_config.yaml"}


@pytest.fixture(scope="module")
def run(cifar_dir, tmp_path_factory):
    """A 2-step tiny run (checkpoint + both exports with their cards) and a kNN results file."""
    from dinov2_hf.hub import hub_callbacks
    from dinov2_hf.training.trainer import Trainer

    root = tmp_path_factory.mktemp("push_run")
    data = write_cifar_subset(cifar_dir, root / "data", rows=48)
    config = tiny_config(data, root / "run", max_steps=2)
    Trainer(config, hub_callbacks(config)).train()
    write_results(root / "knn.json", "knn", {"top1_k10": 0.25, "top1_k20": 0.3125},
                  model="run", dataset={"train": "cifar10 [train]", "test": "cifar10 [test]"})
    return root


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_files(files: dict[str, bytes], folder: Path) -> Path:
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def sample_image(folder: Path) -> Image.Image:
    """``folder/image.jpg`` (what the card's usage code opens), written and read back."""
    Image.fromarray((np.random.RandomState(0).rand(48, 40, 3) * 255).astype("uint8")).save(folder / "image.jpg")
    return Image.open(folder / "image.jpg").convert("RGB")


def run_usage_blocks(card_text: str, repo_id: str, folder: Path, monkeypatch) -> list[dict]:
    """Execute each python block of the card as written, with the repo id pointing at the local folder
    and the working directory holding image.jpg."""
    monkeypatch.chdir(folder.parent)
    assert Path("image.jpg").is_file()
    outputs = []
    for block in re.findall(r"```python\n(.*?)```", card_text, flags=re.S):
        namespace = {}
        exec(block.replace(f'"{repo_id}"', repr(str(folder))), namespace)
        outputs.append(namespace)
    return outputs


def test_push_uploads_a_backbone_that_stock_transformers_loads(run, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import eval_results_to_model_index, model_index_to_eval_results
    from transformers import AutoImageProcessor, AutoModel, pipeline

    from dinov2_hf import Dinov2HFModel

    before = tree_digest(run / "run")
    with fake_hub(monkeypatch) as hub:
        result, staged = push_checkpoint(run / "run", "me/tiny-dinov2", revision="dev", commit_message="First upload",
                                         eval_results=[run / "knn.json"])
    assert tree_digest(run / "run") == before  # nothing written into the run
    assert hub.created == [{"name": "tiny-dinov2", "organization": "me", "visibility": "public", "type": "model"}]
    assert hub.branches == [("me/tiny-dinov2", "dev")]
    [commit] = hub.commits
    assert (commit.repo_id, commit.revision, commit.message) == ("me/tiny-dinov2", "dev", "First upload")
    assert set(commit.files) == STOCK_FILES | {f"dinov2_hf/{name}" for name in OURS_FILES}
    assert sorted(commit.files) == result.files == staged.files
    assert result.commit_url == f"https://huggingface.co/me/tiny-dinov2/commit/{commit.oid}" and result.pr_url is None
    assert hub.repos[("model", "me/tiny-dinov2")].refs["main"] == {}  # the branch got it, main did not

    uploaded = write_files(commit.files, tmp_path / "uploaded")
    source = Dinov2HFModel.from_pretrained(run / "run" / "export" / "dinov2_hf").eval()
    image = sample_image(tmp_path)
    model = AutoModel.from_pretrained(uploaded)
    processor = AutoImageProcessor.from_pretrained(uploaded)
    assert type(model).__name__ == "Dinov2Model"
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = source(pixel_values)
        got = model(pixel_values=pixel_values)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-5)
    tokens = pipeline("image-feature-extraction", model=str(uploaded))(image, return_tensors=True)
    torch.testing.assert_close(tokens, expected.last_hidden_state, rtol=1e-4, atol=1e-5)

    # the heads for continued training are the checkpoint's EMA teacher heads
    checkpoint = load_file(run / "run" / "checkpoints" / "checkpoint-2" / "model.safetensors")
    heads = load_file(uploaded / "dinov2_hf" / "heads.safetensors")
    assert any(k.startswith("dino_head.") for k in heads)
    assert set(heads) == {k[len("teacher."):] for k in checkpoint if k.startswith("teacher.") and not k.startswith("teacher.backbone.")}
    for name, tensor in heads.items():
        torch.testing.assert_close(tensor, checkpoint[f"teacher.{name}"], rtol=0, atol=0)
    # ... and the uploaded dinov2_hf/ folder is a distillation teacher, like the checkpoint itself
    from dinov2_hf.training.build import load_teacher

    published, checkpointed = (load_teacher(f)[0].state_dict() for f in (uploaded / "dinov2_hf", run / "run" / "checkpoints" / "checkpoint-2"))
    assert published.keys() == checkpointed.keys() and all(torch.equal(published[k], checkpointed[k]) for k in published)

    # the card: parses, metadata as the Hub wants it, model-index round-trips, usage code runs as written
    card = ModelCard.load(uploaded / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "image-feature-extraction", "apache-2.0")
    assert "dinov2" in data.tags and data.base_model is None and data.datasets is None  # local data, no teacher
    assert {(e.metric_name, e.metric_value) for e in data.eval_results} == {("kNN top-1 (k=10)", 0.25), ("kNN top-1 (k=20)", 0.3125)}
    name, results = model_index_to_eval_results(eval_results_to_model_index(data.model_name, data.eval_results))
    assert name == "tiny-dinov2" and results == data.eval_results
    assert "| Image Classification | cifar10 [test] | test | kNN top-1 (k=20) | 0.3125 |" in card.text
    assert "| optimizer steps | 2 |" in card.text and "| processes | 1 (cpu) |" in card.text and "training wall time" in card.text
    assert "![PCA of the patch features](pca_features.png)" in card.text
    assert Image.open(uploaded / "pca_features.png").size == (448, 224)
    outputs = run_usage_blocks(card.text, "me/tiny-dinov2", uploaded, monkeypatch)
    assert len(outputs) == 2  # stock at the root, ours in dinov2_hf/
    for namespace in outputs:
        torch.testing.assert_close(namespace["features"], expected.pooler_output, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[0]["tokens"], expected.last_hidden_state, rtol=1e-4, atol=1e-5)


def test_push_a_checkpoint_as_a_private_pull_request_in_our_format(run, tmp_path, monkeypatch):
    from transformers import AutoModel

    checkpoint = run / "run" / "checkpoints" / "checkpoint-2"
    before = tree_digest(checkpoint)
    with fake_hub(monkeypatch, xet=False) as hub:  # huggingface_hub's LFS path, create_pr on the commit
        push_checkpoint(checkpoint, "me/tiny-ours", fmt="stock")  # creates the repo on main first
        result, _ = push_checkpoint(checkpoint, "me/tiny-ours", private=True, create_pr=True, fmt="ours")
    assert tree_digest(checkpoint) == before
    assert hub.created[1] == {"name": "tiny-ours", "organization": "me", "type": "model", "visibility": "private"}
    main, pull = hub.commits
    assert main.revision == "main" and set(main.files) == STOCK_FILES
    assert len(hub.blobs) >= 3  # model.safetensors of each commit and the heads went up as LFS objects
    assert pull.revision == "refs/pr/1" and result.pr_url == "https://huggingface.co/me/tiny-ours/discussions/1"
    assert pull.message == "Upload DINOv2 backbone (step 2) with dinov2_hf"
    assert set(pull.files) == OURS_FILES | {"README.md", "pca_features.png"}
    ours = write_files(pull.files, tmp_path / "ours")
    stock = write_files(main.files, tmp_path / "stock")
    model = AutoModel.from_pretrained(ours, trust_remote_code=True)  # the shipped modeling code
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).pooler_output, AutoModel.from_pretrained(stock)(pixel_values).pooler_output,
                                   rtol=1e-4, atol=1e-5)


def test_push_failures_are_clear_and_leave_the_source_alone(run, monkeypatch, capsys):
    from dinov2_hf.cli import main

    source = run / "run"
    before = tree_digest(source)
    with fake_hub(monkeypatch, token=None) as hub, monkeypatch.context() as patch:
        patch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(run / "no-token-here"))
        with pytest.raises(RuntimeError, match="no Hugging Face token: run `hf auth login` or set HF_TOKEN"):
            push_checkpoint(source, "me/x")
        assert hub.requests == []
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):  # the test session's own offline mode
        push_checkpoint(source, "me/x")
    assert main(["push", str(source), "me/bad--name"]) == 2
    assert "invalid repo id 'me/bad--name'" in capsys.readouterr().err
    assert main(["push", str(source), "me/x", "--revision", "dev", "--create-pr"]) == 2
    assert "drop --revision dev or --create-pr" in capsys.readouterr().err
    assert main(["push", str(run / "data"), "me/x", "--dry-run"]) == 2
    assert "holds no export" in capsys.readouterr().err
    with fake_hub(monkeypatch) as hub:
        hub.fail["commit"] = [403]
        assert main(["push", str(source), "me/x"]) == 2
        err = capsys.readouterr().err
        assert "dinov2-hf push: error: upload to me/x failed" in err and "Nothing local was changed; rerun the same command" in err
        assert hub.commits == []
        hub.fail["preupload"] = [503]  # retried by huggingface_hub's http_backoff (after 1 s)
        assert main(["push", str(source), "me/x", "--format", "stock"]) == 0
        assert [p for m, p in hub.requests if "preupload" in p][-2:] == ["/api/models/me/x/preupload/main"] * 2
        assert set(hub.commits[0].files) == STOCK_FILES
        assert "commit: https://huggingface.co/me/x/commit/" in capsys.readouterr().out
    assert tree_digest(source) == before


def test_dry_run_stages_without_token_or_network(run, tmp_path, capsys):
    import shutil

    from huggingface_hub import ModelCard

    from dinov2_hf.cli import main
    from dinov2_hf.eval.results import update_model_card

    # an export whose card already holds results (dinov2-hf eval --model-card), pushed with more results
    export = shutil.copytree(run / "run" / "export", tmp_path / "export")
    linear = {"task": "linear", "metrics": {"top1": 0.4}, "dataset": {"test": "cifar10 [test]"}}
    stale_knn = {"task": "knn", "metrics": {"top1_k20": 0.1}, "dataset": {"test": "cifar10 [test]"}}
    update_model_card(export / "transformers" / "README.md", [linear, stale_knn], model_name="tiny")
    args = ["push", str(export / "transformers"), "me/tiny", "--dry-run", "--stage-dir", str(tmp_path / "stage"),
            "--eval-results", str(run / "knn.json")]
    assert main(args) == 0
    printed = capsys.readouterr().out.splitlines()
    # an export copied away from its run: no checkpoint beside it, so no heads or recipe to add
    assert printed[0] == f"would upload 10 files from {export / 'transformers'} to me/tiny (main), format both:"
    assert printed[-1] == f"staged in {tmp_path / 'stage'}"
    without_run = OURS_FILES - {"heads.safetensors", "train_config.yaml"}
    assert {line.strip() for line in printed[1:-1]} == STOCK_FILES | {f"dinov2_hf/{name}" for name in without_run}
    values = {e.metric_name: e.metric_value for e in ModelCard.load(tmp_path / "stage" / "README.md").data.eval_results}
    assert values == {"Linear probe top-1": 0.4, "kNN top-1 (k=10)": 0.25, "kNN top-1 (k=20)": 0.3125}  # the file's kNN replaced the card's
    assert main(["push", str(run / "run"), "me/tiny", "--dry-run", "--eval-results", str(tmp_path / "missing.json")]) == 2
    assert "eval results file" in capsys.readouterr().err


def test_push_to_hub_after_training(cifar_dir, tmp_path, monkeypatch):
    from dinov2_hf.hub.training import hub_callbacks, push_callback
    from dinov2_hf.training.trainer import Trainer

    with pytest.raises(ConfigError, match="push_to_hub=true needs hub.repo_id"):
        tiny_config(tmp_path, tmp_path / "x", extra=("hub.push_to_hub=true",))
    data = write_cifar_subset(cifar_dir, tmp_path / "data", rows=32)
    config = tiny_config(data, tmp_path / "run", extra=("hub.push_to_hub=true", "hub.repo_id=me/trained", "hub.format=stock"), max_steps=1)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set"):
        hub_callbacks(config)  # where the run starts, before any training
    with fake_hub(monkeypatch) as hub:
        hub.fail["create"] = [403]  # the push fails: reported, the export stays
        callbacks = hub_callbacks(config)
        Trainer(config, callbacks).train()
        pusher = push_callback(callbacks)
        assert pusher.result is None and "upload to me/trained failed" in str(pusher.error)
        assert (tmp_path / "run" / "export" / "transformers" / "model.safetensors").is_file()
        config.train.max_steps = 2
        callbacks = hub_callbacks(config)
        Trainer(config, callbacks).train()  # resumes, trains one more step, exports, pushes
    assert push_callback(callbacks).result.commit_url.startswith("https://huggingface.co/me/trained/commit/")
    [commit] = hub.commits
    assert set(commit.files) == STOCK_FILES and commit.message == "Upload DINOv2 backbone (step 2) with dinov2_hf"
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 1 and state["train_seconds"] > 0


def test_push_dataset_with_its_card(cifar_dir, tmp_path, monkeypatch, capsys):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    from dinov2_hf.curate.config import SourceSettings
    from dinov2_hf.curate.write import SourceSelection, write_card, write_dataset

    settings = SourceSettings(source=str(cifar_dir / "test-00000-of-00001.parquet"), label_column="label")
    curated = tmp_path / "curated"
    write_dataset([SourceSelection("pool", settings, np.arange(0, 40, 3))], curated)
    write_card(curated, "tiny curated", {"pool rows": 40, "written": 14}, {"pool": settings.source}, {"k": 1})
    before = tree_digest(curated)
    with fake_hub(monkeypatch, xet=False) as hub:  # datasets preuploads its shards as LFS objects
        result, summary = push_dataset(curated, "me/curated", commit_message="Curated")
    assert tree_digest(curated) == before
    assert summary == {"images": 14, "shards": 1, "files": ["README.md", "manifest.csv"]}
    repo = hub.repos[("dataset", "me/curated")]
    files = repo.refs["main"]
    assert hub.created[0] == {"name": "curated", "organization": "me", "visibility": "public", "type": "dataset"}
    assert [c.message for c in hub.commits] == ["Curated: dataset card", "Curated"]
    assert "manifest.csv" in files and result.commit_url.endswith(repo.heads["main"])
    shards = [name for name in files if name.startswith("data/") and name.endswith(".parquet")]
    assert shards
    downloaded = write_files({name: files[name] for name in shards + ["README.md"]}, tmp_path / "downloaded")
    card = DatasetCard.load(downloaded / "README.md")
    assert card.data.pretty_name == "tiny curated" and "dinov2" in card.data.tags  # ours, kept
    assert card.data.dataset_info["splits"][0]["num_examples"] == 14  # push_to_hub's, merged in
    assert "## Counts per stage" in card.text
    pushed = load_dataset("parquet", data_files=[str(downloaded / s) for s in shards], split="train")
    local = load_dataset("parquet", data_files=str(curated / "data" / "*.parquet"), split="train")
    assert pushed.features == local.features and pushed.features["image"].__class__.__name__ == "Image"
    assert [row["image"]["bytes"] for row in pushed.cast_column("image", pushed.features["image"].__class__(decode=False))] == \
        [row["image"]["bytes"] for row in local.cast_column("image", local.features["image"].__class__(decode=False))]

    # as a pull request, from the command line: card and data land on the same PR ref
    from dinov2_hf.cli import main

    with fake_hub(monkeypatch, xet=False) as hub:
        assert main(["push-dataset", str(curated), "me/curated", "--create-pr"]) == 0
    printed = capsys.readouterr().out
    assert f"uploaded {curated} to dataset me/curated (main, pull request): 14 images in 1 shard(s), with README.md and manifest.csv" in printed
    assert "pull request: https://huggingface.co/datasets/me/curated/discussions/1" in printed
    assert [c.revision for c in hub.commits] == ["refs/pr/1", "refs/pr/1"] and hub.repos[("dataset", "me/curated")].refs["main"] == {}


def test_card_metadata_names_hub_datasets_and_the_teachers_repo(tmp_path):
    import yaml
    from huggingface_hub import ModelCard

    from dinov2_hf.hub.model_card import is_hub_id, model_card, teacher_repo_id
    from dinov2_hf.training.config import load_train_config

    assert is_hub_id("facebook/dinov2-large") and not is_hub_id("cifar10")
    assert not is_hub_id("../shared/data/cifar10/train-00000-of-00005.parquet") and not is_hub_id("data/*.parquet")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("me/bad--name")
    # a local checkpoint of ours that was pushed; a Hub cache snapshot; an anonymous folder
    pushed = tmp_path / "checkpoint-10"
    pushed.mkdir()
    (pushed / "train_config.yaml").write_text(yaml.safe_dump({"hub": {"push_to_hub": True, "repo_id": "me/big-teacher"}}))
    snapshot = tmp_path / "hub" / "models--facebook--dinov2-large" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert teacher_repo_id("facebook/dinov2-large") == "facebook/dinov2-large"
    assert teacher_repo_id(str(pushed)) == "me/big-teacher"
    assert teacher_repo_id(str(snapshot)) == "facebook/dinov2-large"
    assert teacher_repo_id(str(tmp_path)) is None

    config = load_train_config("distill_cifar10", ["data.source=my-org/street-images", f"distill.teacher={snapshot}"])
    card = model_card("me/student", config=config, steps=5)
    loaded = ModelCard(str(card))
    assert loaded.data.datasets == ["my-org/street-images"] and loaded.data.base_model == "facebook/dinov2-large"
    assert "distilled from the DINOv2 teacher" in loaded.text
    config = load_train_config("distill_cifar10", ["data.source=images/", f"distill.teacher={tmp_path}"])
    data = ModelCard(str(model_card("me/student", config=config))).data
    assert data.datasets is None and data.base_model is None  # omitted rather than invalid


def test_an_fsdp2_checkpoint_stages_from_its_dcp_shards(run, tmp_path):
    """A checkpoint holding only sharded/ (DCP, as FSDP2 runs write) stages the same backbone and heads."""
    import shutil

    import torch.distributed.checkpoint as dcp

    from dinov2_hf.hub import stage_upload

    source = run / "run" / "checkpoints" / "checkpoint-2"
    sharded = tmp_path / "checkpoints" / "checkpoint-2"
    shutil.copytree(source, sharded, ignore=shutil.ignore_patterns("model.safetensors", "optimizer.bin"))
    weights = load_file(source / "model.safetensors")
    dcp.save({"model": weights, "optimizer": {"state": {}}}, checkpoint_id=str(sharded / "sharded"))
    a = stage_upload(source, tmp_path / "a", fmt="both")
    b = stage_upload(sharded, tmp_path / "b", fmt="both")
    assert a.files == b.files
    for name in ("model.safetensors", "dinov2_hf/model.safetensors", "dinov2_hf/heads.safetensors"):
        left, right = load_file(a.folder / name), load_file(b.folder / name)
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)

