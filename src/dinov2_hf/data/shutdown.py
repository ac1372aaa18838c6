"""Let the Arrow threads of dropped `datasets` streams finish before the interpreter exits.

Streaming parquet leaves Arrow scanner threads behind when a pass stops early (a training run's last pass,
a capped monitor read); if they are still alive at interpreter exit the process aborts with "terminate
called without an active exception" (huggingface/datasets#7566, apache/arrow#45214). A script or notebook
that streams and then exits wraps that work once::

    with arrow_threads_finish():
        result = Trainer(config).train()

``dinov2-hf train`` and ``distill`` do this around the whole run.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager

from datasets import config as datasets_config


@contextmanager
def arrow_threads_finish() -> Iterator[None]:
    """Run the body; then, whether it returned or raised, collect the streams it dropped and give their
    threads the time `datasets` itself waits for them (``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN``),
    once. An exception of the body propagates unchanged."""
    try:
        yield
    finally:
        gc.collect()  # the dropped stream iterators are freed, and stop their scanners
        time.sleep(datasets_config.SLEEP_TIME_ON_THREADS_SHUTDOWN)
