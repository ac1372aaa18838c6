"""Stage what a Hub repo of one of our runs holds, in a local folder, before any upload.

Layout (``fmt``):

- ``stock`` (and ``both``): the stock transformers backbone at the root (``config.json``,
  ``model.safetensors``, ``preprocessor_config.json``): ``AutoModel`` / ``pipeline`` load it without
  ``trust_remote_code``.
- ``both``: our format in ``dinov2_hf/`` with the EMA heads (``heads.safetensors``) and the recipe
  (``train_config.yaml``), for continued training or distillation.
- ``ours``: our format (with heads and recipe) at the root.

Every layout has the model card (``README.md``) and its PCA feature image (``pca_features.png``) at the root.
The source is read, never written: a checkpoint is exported into the staging folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, SAFE_WEIGHTS_NAME

from ..training import run_dir
from ..training.run_dir import OURS_FORMAT, STOCK_FORMAT, RunDir

FORMATS = ("stock", "ours", "both")
OURS_SUBFOLDER = OURS_FORMAT  # our format's folder in a "both" repo, named like the run's export subfolder
PCA_IMAGE = "pca_features.png"
BACKBONE_FILES = (CONFIG_NAME, SAFE_WEIGHTS_NAME, IMAGE_PROCESSOR_NAME)


@dataclass
class RunSource:
    """What a SOURCE folder gives: export folders by format, and the run's checkpoint and records if known."""

    exports: dict[str, Path] = field(default_factory=dict)  # "transformers" / "dinov2_hf" -> folder
    checkpoint: Path | None = None
    run: RunDir | None = None
    config: object | None = None  # TrainConfig
    steps: int | None = None
    last_record: dict | None = None
    compute: dict | None = None


def _model_type(folder: Path) -> str | None:
    config = folder / CONFIG_NAME
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def _format_of(folder: Path) -> str | None:
    model_type = _model_type(folder)
    if model_type is None:
        return None
    return OURS_FORMAT if model_type == "dinov2_hf" else STOCK_FORMAT


def resolve_source(source: str | Path) -> RunSource:
    """Find the exports, checkpoint and recipe of SOURCE: a run's output_dir, its ``export/`` folder, one
    export subfolder, or a ``checkpoint-<step>`` folder. Raises FileNotFoundError naming what is expected."""
    path = Path(source)
    expected = "pass a run's output_dir, its export/ folder, an export subfolder or a checkpoint-<step> folder"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: {expected}.")
    found = RunSource()
    if run_dir.is_checkpoint(path):  # a checkpoint: exported later, into the staging folder
        found.checkpoint, found.run = path, RunDir.of_checkpoint(path)
    elif RunDir(path).export.is_dir():
        found.run = RunDir(path)
        export = found.run.export
    elif any((path / fmt).is_dir() for fmt in run_dir.EXPORT_FORMATS):
        found.run, export = RunDir(path.parent), path
    elif _format_of(path):
        export = path.parent
        found.exports[_format_of(path)] = path
        found.run = RunDir(export.parent) if export.name == run_dir.EXPORT_DIR else None
    else:
        raise FileNotFoundError(
            f"{path} holds no export ({STOCK_FORMAT}/ or {OURS_FORMAT}/ with {CONFIG_NAME}), no {run_dir.EXPORT_DIR}/ "
            f"folder and no checkpoint ({run_dir.TRAINER_STATE_FILE}): {expected}."
        )
    if found.checkpoint is None:
        # the run's exports (or, given one export subfolder, its sibling in the other format)
        for fmt in run_dir.EXPORT_FORMATS:
            if fmt not in found.exports and _format_of(export / fmt) == fmt:
                found.exports[fmt] = export / fmt
        if found.run is not None:
            found.checkpoint = found.run.latest()
        if not found.exports:
            raise FileNotFoundError(f"{path}: no exported backbone ({CONFIG_NAME}) found.")
    _read_run_records(found)
    return found


def _read_run_records(found: RunSource) -> None:
    """Recipe, step, compute and last metrics of the checkpoint and its run, when present."""
    checkpoint = found.checkpoint
    if checkpoint is not None and run_dir.has_recipe(checkpoint):
        found.config = run_dir.read_recipe(checkpoint)
        state = run_dir.read_trainer_state(checkpoint)
        found.steps = state["step"]
        found.compute = {k: state[k] for k in ("num_processes", "device", "mixed_precision", "train_seconds") if k in state}
    if found.run is not None:
        records = found.run.read_metrics(before_step=found.steps)
        found.last_record = records[-1] if records else None


def _copy_backbone(source: Path, destination: Path, export_format: str) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    names = list(BACKBONE_FILES)
    if export_format == OURS_FORMAT:
        names += [p.name for p in source.glob("*.py")]
    for name in names:
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source} lacks {name}: not a complete export.")
        shutil.copy2(source / name, destination / name)


def _crop_size(folder: Path) -> int:
    processor = json.loads((folder / IMAGE_PROCESSOR_NAME).read_text())
    crop = processor.get("crop_size", 224)
    return crop["height"] if isinstance(crop, dict) else int(crop)


@dataclass
class StagedUpload:
    """A staged upload folder: its files (relative, sorted) and card."""

    folder: Path
    files: list[str]
    card: object  # huggingface_hub.ModelCard
    steps: int | None


def read_eval_records(files: list[str | Path]) -> list[dict]:
    """``dinov2-hf eval --output`` JSON records; a missing or foreign file fails naming it."""
    records = []
    for file in files:
        if not Path(file).is_file():
            raise FileNotFoundError(f"eval results file {file} does not exist (write one with `dinov2-hf eval ... --output FILE`).")
        record = json.loads(Path(file).read_text())
        if "task" not in record or "metrics" not in record:
            raise ValueError(f"{file} is not a `dinov2-hf eval --output` results file (needs task and metrics).")
        records.append(record)
    return records


def _stage_backbones(run: RunSource, stock_dir: Path | None, ours_dir: Path | None, scratch: Path) -> None:
    """Copy the run's exports into the staging folders; export the missing formats from the checkpoint (or
    convert the one export there is); the EMA heads and the recipe go beside our format."""
    from safetensors.torch import save_file

    from ..modeling.loading import load_backbone
    from ..modeling.save import export_transformers, save_ours

    backbone, heads, crop = None, {}, None
    if run.checkpoint is not None and run.config is not None:
        ema = run_dir.read_ema(run.checkpoint, run.config)
        backbone, heads, crop = ema.backbone, ema.heads, ema.crop_size
    elif not run.exports:
        raise FileNotFoundError(
            f"{run.checkpoint} has no {run_dir.CONFIG_FILE} (checkpoints carry it since distillation support): "
            "push the run's export/ folder instead."
        )
    try:
        for export_format, target in ((STOCK_FORMAT, stock_dir), (OURS_FORMAT, ours_dir)):
            if target is None:
                continue
            if export_format in run.exports:  # the run's own export, as written at the end of training
                _copy_backbone(run.exports[export_format], target, export_format)
                continue
            if backbone is None:  # only the other format was exported: convert it
                other = next(iter(run.exports.values()))
                backbone, crop = load_backbone(other)[0], _crop_size(other)
            save = export_transformers if export_format == STOCK_FORMAT else save_ours
            save(backbone, scratch / export_format, crop_size=crop)
            _copy_backbone(scratch / export_format, target, export_format)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if ours_dir is not None:
        if heads:
            save_file({k: v.contiguous() for k, v in heads.items()}, str(ours_dir / run_dir.HEADS_FILE))
        if run.checkpoint is not None and run_dir.has_recipe(run.checkpoint):
            shutil.copy2(run.checkpoint / run_dir.CONFIG_FILE, ours_dir / run_dir.CONFIG_FILE)


def _eval_results(run: RunSource, records: list[dict]) -> list:
    """Model-index entries: those already in the exports' cards (``dinov2-hf eval --model-card``), replaced
    by those of ``records`` for the same task, dataset, split and metric."""
    from huggingface_hub import ModelCard

    from ..eval.results import eval_results

    key = lambda e: (e.task_type, e.dataset_name, e.dataset_split, e.metric_name)  # noqa: E731
    entries = {}
    for export in run.exports.values():
        if (export / "README.md").is_file():
            for entry in ModelCard.load(export / "README.md", ignore_metadata_errors=True).data.eval_results or []:
                entries[key(entry)] = entry
    for record in records:
        for entry in eval_results(record):
            entries[key(entry)] = entry
    return list(entries.values())


def stage_upload(
    source: str | Path,
    folder: str | Path,
    fmt: str = "both",
    repo_id: str | None = None,
    eval_files: list[str | Path] = (),
) -> StagedUpload:
    """Stage SOURCE's backbone in ``folder`` (created; must be new or empty) in layout ``fmt``, with a model
    card whose usage code loads ``repo_id`` (or the folder), model-index entries from ``eval_files``
    (``dinov2-hf eval --output`` JSON) and those already in the export's card, and the PCA feature image."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    from ..eval.visualize import pca_figure
    from ..modeling.loading import load_backbone
    from .model_card import model_card

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(FORMATS)}.")
    records = read_eval_records(list(eval_files))  # before any work: a bad file stops here
    run = resolve_source(source)
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"staging folder {folder} is not empty: pass a new folder.")
    folder.mkdir(parents=True, exist_ok=True)
    stock_dir = folder if fmt in ("stock", "both") else None
    ours_dir = {"ours": folder, "both": folder / OURS_SUBFOLDER}.get(fmt)
    _stage_backbones(run, stock_dir, ours_dir, scratch=folder.parent / f".{folder.name}-scratch")

    model, _ = load_backbone(ours_dir or stock_dir)
    pca_figure(model, Image.fromarray(load_sample_image("china.jpg"))).save(folder / PCA_IMAGE)
    card = model_card(
        repo_id or str(folder), OURS_FORMAT if fmt == "ours" else STOCK_FORMAT, config=run.config, steps=run.steps,
        last_record=run.last_record, compute=run.compute, eval_results=_eval_results(run, records),
        model_name=repo_id.split("/")[-1] if repo_id else None, pca_image=PCA_IMAGE,
        subfolders={OURS_FORMAT: OURS_SUBFOLDER} if fmt == "both" else None,
    )
    card.save(folder / "README.md")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return StagedUpload(folder=folder, files=files, card=card, steps=run.steps)
