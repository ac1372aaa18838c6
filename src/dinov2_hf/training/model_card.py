"""The model card written beside every export: what was trained, on what, for how long, and how to load it."""

from __future__ import annotations

from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..config_utils import to_dict

USAGE = {
    "transformers": """```python
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{path}")
model = AutoModel.from_pretrained("{path}")
features = model(**processor(image, return_tensors="pt")).pooler_output  # CLS embedding
```""",
    "dinov2_hf": """```python
import dinov2_hf  # registers the dinov2_hf model type (or pass trust_remote_code=True)
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{path}")
model = AutoModel.from_pretrained("{path}")
features = model(**processor(image, return_tensors="pt")).pooler_output  # CLS embedding
```""",
}


def training_model_card(config, steps: int, last_record: dict | None, export_format: str, path: str | Path) -> ModelCard:
    """A card for the backbone exported after ``steps`` steps of ``config`` (a TrainConfig).

    ``export_format`` is ``transformers`` (stock Dinov2, no custom code) or ``dinov2_hf`` (ours).
    """
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        tags=["dinov2", "self-supervised-learning", "vision", "dinov2_hf"],
        license="apache-2.0",
    )
    recipe = yaml.safe_dump({k: v for k, v in to_dict(config).items() if k not in ("monitor",)}, sort_keys=False)
    metrics = ""
    if last_record:
        shown = {k: last_record[k] for k in ("loss", "teacher_entropy", "cls_std", "skipped_images", "knn_top1") if k in last_record}
        metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in shown.items())
        metrics = f"\n## Last training step\n\n| metric | value |\n|---|---|\n{metrics}\n"
    what = (
        f"The EMA of a student distilled from the DINOv2 teacher `{config.distill.teacher}` (DINO + iBOT + KoLeo)"
        if config.distill.teacher
        else "The EMA teacher backbone of a DINOv2 run (DINO + iBOT + KoLeo, multi-crop)"
    )
    content = f"""---
{data.to_yaml()}
---

# DINOv2 backbone trained with dinov2_hf

{what}, after {steps} steps with
{config.train.batch_size_per_device} images per device. Data: `{config.data.source}` (split `{config.data.split}`).
Format: {"stock transformers `Dinov2Model` / `Dinov2WithRegistersModel`" if export_format == "transformers" else "dinov2_hf (heads stay in the training checkpoints)"}.

## Usage

{USAGE[export_format].format(path=path)}
{metrics}
## Training recipe

```yaml
{recipe}```
"""
    return ModelCard(content)
