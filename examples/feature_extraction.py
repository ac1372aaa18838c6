"""Image features with a DINOv2 backbone through stock transformers: AutoModel, AutoImageProcessor, pipeline.

    python examples/feature_extraction.py                 # a randomly initialised ViT-S/14, exported first
    python examples/feature_extraction.py --model DIR     # any exported / stock Dinov2 checkpoint folder

Compares the two sample images that ship with scikit-learn by the cosine similarity of their CLS
embeddings, and shows the patch-feature grid used by dense tasks.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from transformers import AutoImageProcessor, AutoModel, pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder; default: export a random ViT-S/14 to a temporary folder")
    args = parser.parse_args()

    folder = args.model
    if folder is None:
        from dinov2_hf import Dinov2HFConfig, Dinov2HFModel
        from dinov2_hf.modeling.save import export_transformers

        folder = tempfile.mkdtemp(prefix="dinov2-vits14-")
        # Random weights; LayerScale at 1 (training starts at 1e-5) so that the blocks act on the image.
        config = Dinov2HFConfig.from_preset("vits14", layerscale_value=1.0)
        export_transformers(Dinov2HFModel(config), folder)

    images = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    processor = AutoImageProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    with torch.inference_mode():
        outputs = model(**processor(images, return_tensors="pt"))
    cls = torch.nn.functional.normalize(outputs.pooler_output, dim=-1)
    registers = getattr(model.config, "num_register_tokens", 0)
    patches = outputs.last_hidden_state[:, 1 + registers :]
    side = int(patches.shape[1] ** 0.5)
    print(f"CLS embeddings: {tuple(cls.shape)}, cosine(china, flower) = {(cls[0] @ cls[1]).item():.4f}")
    print(f"patch features: {tuple(patches.reshape(len(images), side, side, -1).shape)}")

    extractor = pipeline("image-feature-extraction", model=folder, device="cpu")
    features = extractor(images[0], return_tensors=True)
    print(f"pipeline features: {tuple(features.shape)}, equal to the direct call: "
          f"{torch.allclose(features[0], outputs.last_hidden_state[0], atol=1e-5)}")


if __name__ == "__main__":
    main()
