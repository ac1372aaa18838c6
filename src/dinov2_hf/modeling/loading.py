"""Load any backbone we understand as our ``Dinov2HFModel``: our folders, stock transformers, Meta .pth."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .configuration_dinov2_hf import Dinov2HFConfig
from .modeling_dinov2_hf import Dinov2HFModel
from .strict import from_pretrained_strict

# A Hub model id, owner/name: a path such as ./x, ../x, /x or ~/x is never one.
_HUB_MODEL_ID = re.compile(r"[\w-][\w.-]*/[\w-][\w.-]*")


def load_ours(folder: str | Path) -> Dinov2HFModel:
    """One of our checkpoint folders (model_type ``dinov2_hf``) in eval mode, every weight checked.

    A stock transformers folder is refused here, naming what it is: loaded as ours, its separate q/k/v
    projections would not match our fused ones and all attention would be random.
    """
    from .convert_transformers import STOCK_MODEL_TYPES

    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; pass a dinov2_hf checkpoint folder.")
    model_type = json.loads(config_file.read_text()).get("model_type")
    if model_type != Dinov2HFConfig.model_type:
        hint = (
            "a stock transformers Dinov2 folder: load it with transformers, or convert it with "
            "`dinov2-hf convert --from transformers`"
            if model_type in STOCK_MODEL_TYPES
            else "not a dinov2_hf checkpoint"
        )
        raise ValueError(f"{folder} holds model_type {model_type!r}, not {Dinov2HFConfig.model_type!r}: {hint}.")
    return from_pretrained_strict(Dinov2HFModel, folder).eval()


def check_backbone_source(source: str | Path, name: str = "") -> None:
    """Fail in a moment, before any weights are read, unless ``source`` can be a backbone :func:`load_backbone`
    reads: a checkpoint folder with ``config.json`` and weights, a Meta ``.pth`` file, or a Hub model id
    ``owner/name`` (its existence is not looked up: an unknown, private or uncached id fails when loaded).

    ``name`` goes before the source in the message so that it names the argument or setting, e.g.
    ``"--model "`` or ``"embed.model="``. Raises FileNotFoundError (a missing path, a folder without
    ``config.json`` or without weights) or ValueError (a file that is not a ``.pth``).
    """
    path = Path(source)
    if path.is_file():
        if path.suffix not in (".pth", ".pt"):
            raise ValueError(
                f"{name}{path} is a file but not a Meta checkpoint (.pth); pass a checkpoint folder or a .pth file."
            )
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{name}{path} has no config.json; pass a checkpoint folder, a Meta .pth file or a Hub id."
            )
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise FileNotFoundError(f"{name}{path} has no weights (model.safetensors or pytorch_model.bin).")
    elif not _HUB_MODEL_ID.fullmatch(str(source)):
        raise FileNotFoundError(
            f"{name}{source} does not exist: pass a checkpoint folder, a Meta .pth file or a Hub model id (owner/name)."
        )


def load_backbone(source: str | Path | None = None, preset: str = "vits14") -> tuple[Dinov2HFModel, str]:
    """The backbone in eval mode and a short description of where it came from.

    ``source`` is one of: ``None`` (a randomly initialised ``preset``), a folder saved by us
    (model_type ``dinov2_hf``), a stock transformers ``dinov2`` / ``dinov2_with_registers`` folder,
    a Meta ``.pth`` file, or a Hub model id of either format (read from the local cache when
    ``HF_HUB_OFFLINE=1``).
    """
    from .convert_meta import from_meta
    from .convert_transformers import from_transformers

    if source is None:
        # LayerScale 1, not the official 1e-5: with 1e-5 every image has almost the same CLS token, and a
        # random baseline would rank its neighbours by float rounding (different on every CPU).
        return Dinov2HFModel(Dinov2HFConfig.from_preset(preset, layerscale_value=1.0)).eval(), f"random {preset}"
    check_backbone_source(source)
    path = Path(source)
    if path.is_file():
        return from_meta(path), f"{path} (meta)"
    if path.is_dir():
        from safetensors import SafetensorError

        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        try:
            if model_type == Dinov2HFConfig.model_type:
                return load_ours(path), str(path)
            return from_transformers(path), f"{path} ({model_type})"
        except SafetensorError as error:  # its message names no file
            files = ", ".join(sorted(p.name for p in path.glob("*.safetensors")))
            raise ValueError(f"{path}: its weights ({files}) cannot be read ({error}): the file is damaged (a copy or "
                             "download cut short?) or not a safetensors file. Export or download it again.") from error
    from huggingface_hub import snapshot_download

    # A Hub id: fetched (or read from the cache when offline), then loaded like a local folder.
    try:
        folder = snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.py"])
    except Exception as error:  # offline and not cached, no such repo, gated, no network: all "cannot read it"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        raise FileNotFoundError(
            f"{source}: there is no such local folder or file ({Path(source).resolve()}), and as a Hub model id it "
            f"could not be fetched ({type(error).__name__}: {reason}). Pass an existing checkpoint folder or .pth, "
            "or a Hub id that exists (offline, with HF_HUB_OFFLINE=1, only models already in the cache load: "
            f"`hf download {source}` once while online)."
        ) from error
    model, _ = load_backbone(folder)
    return model, str(source)
