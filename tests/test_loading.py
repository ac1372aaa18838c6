"""check_backbone_source: what every loader of a backbone checks before reading any weights."""

import pytest

from dinov2_hf.modeling.loading import check_backbone_source


def test_a_folder_needs_a_config_and_weights(tmp_path):
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match="checkpoint has no config.json; pass a checkpoint folder"):
        check_backbone_source(folder)
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"has no weights \(model.safetensors or pytorch_model.bin\)"):
        check_backbone_source(folder)
    (folder / "model.safetensors").write_bytes(b"")
    check_backbone_source(folder)  # weights and config: accepted (their contents are the loader's business)


@pytest.mark.parametrize("source", ["missing", "./owner/name", "/owner-name", "~/name", "a/b/c", "owner/"])
def test_a_missing_path_must_look_like_a_hub_id(tmp_path, monkeypatch, source):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist: .* a Hub model id \(owner/name\)"):
        check_backbone_source(source)


def test_hub_ids_and_meta_files_pass_and_the_message_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_backbone_source("facebook/dinov2-small")  # not looked up: offline, it fails when loaded
    (tmp_path / "dinov2_vits14.pth").write_bytes(b"")
    check_backbone_source("dinov2_vits14.pth")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"^--model notes.txt is a file but not a Meta checkpoint \(.pth\)"):
        check_backbone_source("notes.txt", "--model ")
    with pytest.raises(FileNotFoundError, match="^embed.model=nope does not exist"):
        check_backbone_source("nope", "embed.model=")
