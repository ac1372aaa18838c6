"""Model cards for exports and Hub uploads, built with huggingface_hub's ``ModelCard`` / ``ModelCardData``:
what was trained, on what, with which compute, evaluation results (model-index), a PCA feature image and
usage code that runs as written."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..config_utils import to_dict
from ..training import run_dir

TAGS = ["dinov2", "self-supervised-learning", "vision", "image-feature-extraction", "dinov2_hf"]
# Files of a local copy of a Hub repo live under .../models--<namespace>--<name>/snapshots/<sha>/.
HUB_CACHE_FOLDER = re.compile(r"models--([\w.-]+)--([\w.-]+)$")
FILE_SUFFIXES = (".parquet", ".pth", ".pt", ".tar", ".yaml", ".yml", ".json", ".safetensors", ".jpg", ".png")

USAGE = {
    "transformers": '''```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, pipeline

image = Image.open("image.jpg").convert("RGB")  # any RGB image
processor = AutoImageProcessor.from_pretrained("{path}")
model = AutoModel.from_pretrained("{path}")
features = model(**processor(image, return_tensors="pt")).pooler_output  # (1, hidden): the CLS embedding
extractor = pipeline("image-feature-extraction", model="{path}")
tokens = extractor(image, return_tensors=True)  # (1, tokens, hidden): CLS, registers, patches
```''',
    "dinov2_hf": '''```python
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

image = Image.open("image.jpg").convert("RGB")  # any RGB image
processor = AutoImageProcessor.from_pretrained("{path}"{subfolder})
model = AutoModel.from_pretrained("{path}"{subfolder}, trust_remote_code=True)  # or `import dinov2_hf` first
features = model(**processor(image, return_tensors="pt")).pooler_output  # (1, hidden): the CLS embedding
```''',
}


def is_hub_id(value: str | None) -> bool:
    """Whether ``value`` reads as a namespaced Hub repo id (``owner/name``) rather than a local path or file."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not value or value.count("/") != 1 or any(c in value for c in "*?[") or value.endswith(FILE_SUFFIXES):
        return False
    if Path(value).exists():
        return False
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def teacher_repo_id(teacher: str) -> str | None:
    """The Hub id a distillation teacher stands for: the id itself, the ``hub.repo_id`` a local checkpoint
    of ours was pushed to, or the repo of a Hub cache snapshot; None when nothing identifies it."""
    if is_hub_id(teacher):
        return teacher
    folder = Path(teacher)
    if run_dir.has_recipe(folder):  # raw YAML: a recipe of another version must not stop the card
        hub = (yaml.safe_load((folder / run_dir.CONFIG_FILE).read_text()) or {}).get("hub") or {}
        if hub.get("push_to_hub") and is_hub_id(hub.get("repo_id")):
            return hub["repo_id"]
    for parent in (folder.resolve(), *folder.resolve().parents):
        match = HUB_CACHE_FOLDER.match(parent.name)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def results_table(eval_results: Sequence[EvalResult]) -> str:
    """A markdown table of model-index entries."""
    rows = "\n".join(
        f"| {r.task_name or r.task_type} | {r.dataset_name} | {r.dataset_split or ''} | {r.metric_name or r.metric_type} | {r.metric_value:.4g} |"
        for r in eval_results
    )
    return f"| task | dataset | split | metric | value |\n|---|---|---|---|---|\n{rows}\n"


def _compute_table(config, steps: int | None, compute: dict | None) -> str:
    compute = compute or {}
    rows = []
    if steps is not None:
        rows.append(("optimizer steps", f"{steps:,}"))
    if config is not None:
        train = config.train
        rows.append(("images per device per step", f"{train.batch_size_per_device * train.gradient_accumulation_steps:,}"))
        processes = compute.get("num_processes")
        if processes:
            global_batch = train.batch_size_per_device * train.gradient_accumulation_steps * processes
            rows.append(("processes", f"{processes} ({compute.get('device', '?')})"))
            rows.append(("global batch", f"{global_batch:,}"))
            if steps is not None:
                rows.append(("images seen", f"{global_batch * steps:,}"))
        rows.append(("mixed precision", compute.get("mixed_precision") or train.mixed_precision))
    if compute.get("train_seconds"):
        seconds = int(compute["train_seconds"])
        rows.append(("training wall time", f"{seconds // 3600}h {seconds % 3600 // 60:02d}m {seconds % 60:02d}s"))
    return "".join(f"| {key} | {value} |\n" for key, value in rows)


FORMATS = {
    "transformers": "stock transformers (`Dinov2Model` / `Dinov2WithRegistersModel`, no custom code)",
    "dinov2_hf": "dinov2_hf (config with `auto_map` and the modeling code: `trust_remote_code=True`)",
}


def _summary(config, steps: int | None, export_format: str, base_model: str | None, subfolders: dict[str, str]) -> str:
    """What the backbone is, what it was trained on, its format and the repo's other folders."""
    if config is None:
        what = "A DINOv2 backbone"
    elif config.distill.teacher:
        what = f"The EMA of a student distilled from the DINOv2 teacher `{config.distill.teacher}`"
        if base_model and base_model != config.distill.teacher:
            what += f" ([{base_model}](https://huggingface.co/{base_model}))"
    else:
        what = "The EMA teacher backbone of a DINOv2 run (DINO + iBOT + KoLeo, multi-crop)"
        if config.model.init_from:  # continued pretraining: base_model names the source when it has a Hub id
            what += f" continued from `{config.model.init_from}`"
            if base_model and base_model != config.model.init_from:
                what += f" ([{base_model}](https://huggingface.co/{base_model}))"
    if steps is not None:
        what += f", after {steps} steps"
    lines = [what + (f" with {config.train.batch_size_per_device} images per device." if config is not None else ".")]
    if config is not None:
        lines.append(f"Data: `{config.data.source}` (split `{config.data.split}`).")
    lines.append(f"Format: {FORMATS[export_format]}.")
    lines += [""] + [
        f"- `{folder}/`: the same backbone, format {FORMATS[fmt]}, with the EMA DINO/iBOT heads (`heads.safetensors`) "
        "and the recipe (`train_config.yaml`) for continued training or distillation."
        for fmt, folder in subfolders.items()
    ]
    return "\n".join(lines).rstrip("\n")


def model_card(
    path: str,
    export_format: str = "transformers",
    *,
    config=None,
    steps: int | None = None,
    last_record: dict | None = None,
    compute: dict | None = None,
    eval_results: Sequence[EvalResult] = (),
    model_name: str | None = None,
    pca_image: str | None = None,
    subfolders: dict[str, str] | None = None,
) -> ModelCard:
    """A card for a backbone at ``path`` (a local folder or a Hub repo id) in ``export_format``
    (``transformers``: stock Dinov2, no custom code; ``dinov2_hf``: ours).

    ``config`` is the run's TrainConfig (None for a backbone without a recipe); ``eval_results`` become the
    model-index and a results table; ``pca_image`` is a relative path to a PCA feature figure;
    ``subfolders`` maps other formats in the same repo to their subfolder (e.g. ``{"dinov2_hf": "dinov2_hf"}``).
    """
    eval_results = list(eval_results)
    datasets = [config.data.source] if config is not None and is_hub_id(config.data.source) else None
    # The model this one was trained from: a distillation teacher, or the backbone a continued pretraining started at.
    origin = (config.distill.teacher or config.model.init_from) if config is not None else ""
    base_model = teacher_repo_id(origin) if origin else None  # omitted rather than an invalid value
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=list(TAGS),
        license="apache-2.0",
        datasets=datasets,
        base_model=base_model,
        model_name=(model_name or "dinov2_hf backbone") if eval_results else None,  # model-index needs a name
        eval_results=eval_results or None,
    )
    subfolders = subfolders or {}
    usage = "\n\n".join(
        [USAGE[export_format].format(path=path, subfolder="")]
        + [USAGE[fmt].format(path=path, subfolder=f', subfolder="{folder}"') for fmt, folder in subfolders.items()]
    )
    title = model_name or "DINOv2 backbone trained with dinov2_hf"
    sections = [f"# {title}\n\n{_summary(config, steps, export_format, base_model, subfolders)}"]
    sections.append(f"## Usage\n\n{usage}")
    if pca_image:
        sections.append(
            "## Features\n\nPCA of the last block's patch features of a sample image (first component thresholded "
            "for the foreground, the next three as RGB):\n\n"
            f"![PCA of the patch features]({pca_image})"
        )
    if eval_results:
        sections.append(f"## Results\n\n{results_table(eval_results)}")
    compute_rows = _compute_table(config, steps, compute)
    if compute_rows:
        sections.append(f"## Training compute\n\n| | |\n|---|---|\n{compute_rows}")
    if last_record:
        shown = {k: last_record[k] for k in ("loss", "teacher_entropy", "cls_std", "skipped_images", "knn_top1") if k in last_record}
        rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in shown.items())
        sections.append(f"## Last training step\n\n| metric | value |\n|---|---|\n{rows}\n")
    if config is not None:
        recipe = yaml.safe_dump({k: v for k, v in to_dict(config).items() if k not in ("monitor",)}, sort_keys=False)
        sections.append(f"## Training recipe\n\n```yaml\n{recipe}```\n")
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(s.rstrip("\n") for s in sections) + "\n"
    return ModelCard(content)


def training_model_card(
    config, steps: int, last_record: dict | None, export_format: str, path: str | Path, compute: dict | None = None
) -> ModelCard:
    """The card written beside an export after ``steps`` steps of ``config`` (a TrainConfig)."""
    return model_card(str(path), export_format, config=config, steps=steps, last_record=last_record, compute=compute)
