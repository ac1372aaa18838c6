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

FORMATS = ("stock", "ours", "both")
OURS_SUBFOLDER = "dinov2_hf"
PCA_IMAGE = "pca_features.png"
HEADS_FILE = "heads.safetensors"  # the EMA heads beside our backbone: ssl.distill.load_teacher reads them
BACKBONE_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


@dataclass
class RunSource:
    """What a SOURCE folder gives: export folders by format, and the run's checkpoint and records if known."""

    exports: dict[str, Path] = field(default_factory=dict)  # "transformers" / "dinov2_hf" -> folder
    checkpoint: Path | None = None
    run_dir: Path | None = None
    config: object | None = None  # TrainConfig
    steps: int | None = None
    last_record: dict | None = None
    compute: dict | None = None


def _model_type(folder: Path) -> str | None:
    config = folder / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def _format_of(folder: Path) -> str | None:
    model_type = _model_type(folder)
    if model_type is None:
        return None
    return "dinov2_hf" if model_type == "dinov2_hf" else "transformers"


def resolve_source(source: str | Path) -> RunSource:
    """Find the exports, checkpoint and recipe of SOURCE: a run's output_dir, its ``export/`` folder, one
    export subfolder, or a ``checkpoint-<step>`` folder. Raises FileNotFoundError naming what is expected."""
    from ..training.checkpoint import latest_checkpoint

    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: pass a run's output_dir, its export/ folder, an export subfolder or a checkpoint-<step> folder.")
    found = RunSource()
    if (path / "trainer_state.json").is_file():  # a checkpoint: exported later, into the staging folder
        found.checkpoint = path
        found.run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    elif (path / "export").is_dir():
        found.run_dir, export = path, path / "export"
    elif (path / "transformers").is_dir() or (path / OURS_SUBFOLDER).is_dir():
        found.run_dir, export = path.parent, path
    elif _format_of(path):
        export = path.parent
        found.exports[_format_of(path)] = path
        found.run_dir = path.parent.parent if export.name == "export" else None
    else:
        raise FileNotFoundError(
            f"{path} holds no export (transformers/ or dinov2_hf/ with config.json), no export/ folder and no "
            "checkpoint (trainer_state.json): pass a run's output_dir, its export/ folder, an export subfolder or a checkpoint-<step> folder."
        )
    if found.checkpoint is None:
        if not found.exports:
            found.exports = {fmt: export / fmt for fmt in ("transformers", OURS_SUBFOLDER) if _format_of(export / fmt) == fmt}
        else:  # one export subfolder: its sibling in the other format, when the run wrote both
            for fmt in ("transformers", OURS_SUBFOLDER):
                if fmt not in found.exports and _format_of(export / fmt) == fmt:
                    found.exports[fmt] = export / fmt
        if found.run_dir is not None:
            found.checkpoint = latest_checkpoint(found.run_dir / "checkpoints")
        if not found.exports:
            raise FileNotFoundError(f"{path}: no exported backbone (config.json) found.")
    _read_run_records(found)
    return found


def _read_run_records(found: RunSource) -> None:
    """Recipe, step, compute and last metrics of the checkpoint and its run, when present."""
    from ..objective.distill import TEACHER_CONFIG
    from ..training.config import load_train_config

    checkpoint = found.checkpoint
    if checkpoint is not None and (checkpoint / TEACHER_CONFIG).is_file():
        found.config = load_train_config(checkpoint / TEACHER_CONFIG)
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        found.steps = state["step"]
        found.compute = {k: state[k] for k in ("num_processes", "device", "mixed_precision", "train_seconds") if k in state}
    metrics = found.run_dir / "metrics.jsonl" if found.run_dir is not None else None
    if metrics is not None and metrics.is_file():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if found.steps is not None:
            records = [r for r in records if r["step"] < found.steps]
        found.last_record = records[-1] if records else None


def _sharded_state(folder: Path, prefix: str) -> dict:
    """The full tensors under ``model.<prefix>`` of an FSDP2 checkpoint's DCP folder, read in this one
    process (DCP needs no process group to read; shapes and dtypes come from its metadata)."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    wanted = {key[len("model."):]: entry for key, entry in metadata.items() if key.startswith(f"model.{prefix}")}
    state = {"model": {key: torch.empty(entry.size, dtype=entry.properties.dtype) for key, entry in wanted.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group": reading in one process is what we want
        dcp.load(state, checkpoint_id=str(folder))
    return state["model"]


def checkpoint_backbone(checkpoint: Path, config) -> tuple[object, dict, int]:
    """The exported backbone of a checkpoint (the EMA: teacher, or the distilled student's EMA), its
    other EMA weights (DINO/iBOT heads or distillation projections) and the final global crop size.
    Reads ``model.safetensors``, or the ``sharded/`` DCP folder of an FSDP2 run."""
    from safetensors import safe_open

    from ..modeling import Dinov2HFModel
    from ..objective.meta_arch import build_student_config
    from ..training.parallel import SHARDED_DIR

    ema = "student_ema" if config.distill.teacher else "teacher"
    if (checkpoint / "model.safetensors").is_file():
        with safe_open(checkpoint / "model.safetensors", framework="pt") as file:  # the EMA part only
            state = {key: file.get_tensor(key) for key in file.keys() if key.startswith(f"{ema}.")}
    elif (checkpoint / SHARDED_DIR).is_dir():
        state = _sharded_state(checkpoint / SHARDED_DIR, f"{ema}.")
    else:
        raise FileNotFoundError(f"{checkpoint} has neither model.safetensors nor {SHARDED_DIR}/: not a complete checkpoint.")
    backbone = Dinov2HFModel(build_student_config(config))
    prefix = f"{ema}.backbone."
    backbone.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    heads = {k[len(ema) + 1:]: v for k, v in state.items() if k.startswith(f"{ema}.") and not k.startswith(prefix)}
    steps = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
    adapted = config.adaptation.steps and steps > config.main_steps
    crop = config.adaptation.global_crops_size if adapted else config.crops.global_crops_size
    return backbone.eval(), heads, crop


def _copy_backbone(source: Path, destination: Path, export_format: str) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    names = list(BACKBONE_FILES)
    if export_format == OURS_SUBFOLDER:
        names += [p.name for p in source.glob("*.py")]
    for name in names:
        if not (source / name).is_file():
            raise FileNotFoundError(f"{source} lacks {name}: not a complete export.")
        shutil.copy2(source / name, destination / name)


def _crop_size(folder: Path) -> int:
    processor = json.loads((folder / "preprocessor_config.json").read_text())
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

    from ..modeling.convert import export_transformers, save_ours
    from ..modeling.loading import load_backbone

    backbone, heads, crop = None, {}, None
    if run.checkpoint is not None and run.config is not None:
        backbone, heads, crop = checkpoint_backbone(run.checkpoint, run.config)
    elif not run.exports:
        raise FileNotFoundError(
            f"{run.checkpoint} has no train_config.yaml (checkpoints carry it since distillation support): "
            "push the run's export/ folder instead."
        )
    try:
        for export_format, target in (("transformers", stock_dir), (OURS_SUBFOLDER, ours_dir)):
            if target is None:
                continue
            if export_format in run.exports:  # the run's own export, as written at the end of training
                _copy_backbone(run.exports[export_format], target, export_format)
                continue
            if backbone is None:  # only the other format was exported: convert it
                other = next(iter(run.exports.values()))
                backbone, crop = load_backbone(other)[0], _crop_size(other)
            save = export_transformers if export_format == "transformers" else save_ours
            save(backbone, scratch / export_format, crop_size=crop)
            _copy_backbone(scratch / export_format, target, export_format)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if ours_dir is not None:
        if heads:
            save_file({k: v.contiguous() for k, v in heads.items()}, str(ours_dir / HEADS_FILE))
        if run.checkpoint is not None and (run.checkpoint / "train_config.yaml").is_file():
            shutil.copy2(run.checkpoint / "train_config.yaml", ours_dir / "train_config.yaml")


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
        repo_id or str(folder), "dinov2_hf" if fmt == "ours" else "transformers", config=run.config, steps=run.steps,
        last_record=run.last_record, compute=run.compute, eval_results=_eval_results(run, records),
        model_name=repo_id.split("/")[-1] if repo_id else None, pca_image=PCA_IMAGE,
        subfolders={"dinov2_hf": OURS_SUBFOLDER} if fmt == "both" else None,
    )
    card.save(folder / "README.md")
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return StagedUpload(folder=folder, files=files, card=card, steps=run.steps)
