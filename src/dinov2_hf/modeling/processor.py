"""The DINOv2 image processor: transformers' BitImageProcessor with DINOv2's settings.

transformers registers DINOv2 with a BitImageProcessor whose defaults are not DINOv2's; the
released checkpoints use: resize the shortest edge to 256 (bicubic), center crop 224, ImageNet
mean and standard deviation. Other crops keep that 256:224 proportion (:func:`resize_for_crop`).
"""

from __future__ import annotations

from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


def resize_for_crop(crop_size: int) -> int:
    """The shortest edge to resize to before a center crop of ``crop_size``: the released 256:224 proportion
    (224 -> 256, 518 -> 592)."""
    return round(crop_size * 256 / 224)


def dinov2_image_processor(crop_size: int = 224, resize_size: int | None = None):
    """A BitImageProcessor configured for DINOv2 (saved as ``image_processor_type: BitImageProcessor``).

    ``resize_size`` defaults to :func:`resize_for_crop` of ``crop_size``. Uses the PIL backend when
    torchvision is not installed, so that it works everywhere.
    """
    resize_size = resize_size or resize_for_crop(crop_size)
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import BitImageProcessor as processor_class
    else:
        from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil as processor_class
    return processor_class(
        do_resize=True,
        size={"shortest_edge": resize_size},
        resample=BICUBIC,
        do_center_crop=True,
        crop_size={"height": crop_size, "width": crop_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def saved_image_processor(folder: str | Path | None):
    """The image processor saved beside a model (``preprocessor_config.json``: its own crop size and
    normalisation), or None when ``folder`` is not a folder holding one."""
    if folder is None or not (Path(folder) / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)
