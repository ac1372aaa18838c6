"""The kNN monitor: weighted kNN top-1 of the exported backbone's CLS on a labelled source during training.

Built on the evaluation code: images are decoded by ``eval.features.labelled_images``, preprocessed by the
DINOv2 image processor (sized to the global crops) and scored by ``eval.knn.knn_classify``. The forward
pass is the trainer's own (under its autocast, and with every rank in it for a sharded model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable

import torch

from ..data.sources import DataSettings, SourceKeys, load_image_stream
from ..eval.features import labelled_images
from ..eval.knn import knn_classify
from ..modeling.processor import dinov2_image_processor
from .config import MonitorSettings


class KnnMonitor:
    """The first ``train_images`` images of ``settings.source`` are the kNN memory, the next ``test_images``
    (or the first ``test_images`` of ``settings.test_source``) the queries. Images are read once, on the first
    call, and kept on the CPU."""

    def __init__(self, settings: MonitorSettings, image_size: int) -> None:
        self.settings, self.image_size = settings, image_size
        for key in ("source", "test_source"):
            if getattr(settings, key):  # a missing source fails now, before the model is built, not at the first call
                load_image_stream(self._data(getattr(settings, key)), keys=self._keys(key))
        self._images: tuple[torch.Tensor, torch.Tensor] | None = None

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The monitor's normalised pixel values and labels."""
        if self._images is None:
            settings = self.settings
            if settings.test_source:  # memory from `source`, queries from `test_source`
                pairs = self._labelled(settings.source, settings.train_images)
                pairs += self._labelled(settings.test_source, settings.test_images, "test_source")
            else:
                pairs = self._labelled(settings.source, settings.train_images + settings.test_images)
            if len(pairs) < 2:
                raise ValueError(f"monitor.source={settings.source!r} gave {len(pairs)} labelled images; need at least 2.")
            processor = dinov2_image_processor(crop_size=self.image_size, resize_size=self.image_size)
            pixels = processor([image for image, _ in pairs], return_tensors="pt")["pixel_values"]
            self._images = (pixels, torch.tensor([label for _, label in pairs]))
        return self._images

    def _data(self, source: str) -> DataSettings:
        settings = self.settings
        return DataSettings(source=source, image_column=settings.image_column, label_column=settings.label_column, shuffle_buffer=0)

    @staticmethod
    def _keys(key: str) -> SourceKeys:
        """Errors name ``monitor.source`` or ``monitor.test_source``."""
        return dataclasses.replace(SourceKeys.section("monitor"), source=f"monitor.{key}")

    def _labelled(self, source: str, wanted: int, key: str = "source") -> list[tuple]:
        """The first ``wanted`` decodable (image, label) pairs of ``source``, in order."""
        settings = self.settings
        stream = load_image_stream(self._data(source), keys=self._keys(key))
        return list(itertools.islice(labelled_images(stream, settings.image_column, settings.label_column, {"skipped": 0}), wanted))

    @torch.no_grad()
    def __call__(
        self,
        backbone: torch.nn.Module,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> float:
        """Weighted kNN top-1 (k = ``settings.k``) of ``backbone``'s normalised CLS."""
        pixels, labels = self.images()
        features = []
        for chunk in pixels.split(256):
            with autocast():
                features.append(backbone(chunk.to(device)).pooler_output.float().cpu())
        features = torch.cat(features)
        n_train, k = min(self.settings.train_images, len(features) - 1), self.settings.k
        return knn_classify(features[:n_train], labels[:n_train], features[n_train:], labels[n_train:], ks=(k,))[k]
