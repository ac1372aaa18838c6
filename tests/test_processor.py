"""The 256:224 resize rule: one function, used by the image processor, conversion, curation and the eval CLI."""

import pytest

from dinov2_hf.cli import build_parser
from dinov2_hf.curate.config import EmbedSettings
from dinov2_hf.curate.embed import BackboneEmbedder
from dinov2_hf.modeling import dinov2_image_processor, resize_for_crop


@pytest.mark.parametrize("crop, resize", [(224, 256), (518, 592), (32, 37), (56, 64), (112, 128), (14, 16)])
def test_resize_for_crop_keeps_the_released_proportion(crop, resize):
    assert resize_for_crop(crop) == resize  # 32 * 256 / 224 = 36.57: rounded, not floored


def test_the_processor_and_its_callers_default_to_the_rule():
    processor = dinov2_image_processor(crop_size=518)
    assert processor.size["shortest_edge"] == 592 and processor.crop_size["height"] == 518
    assert dinov2_image_processor().size["shortest_edge"] == 256
    assert dinov2_image_processor(crop_size=56, resize_size=56).size["shortest_edge"] == 56  # explicit wins
    assert BackboneEmbedder(EmbedSettings(image_size=98)).resize == resize_for_crop(98) == 112
    args = build_parser().parse_args(["eval", "knn"])
    assert args.resize_size == resize_for_crop(args.crop_size)  # the CLI writes 256 out; it must stay the rule's
