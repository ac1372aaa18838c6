"""Let the Arrow threads of dropped `datasets` streams finish before the interpreter exits, once.

Streaming parquet leaves Arrow scanner threads behind when a pass stops early (a training run's last pass,
a capped monitor read); if they are still alive at interpreter exit the process aborts with "terminate
called without an active exception" (huggingface/datasets#7566, apache/arrow#45214). `datasets` guards
against it by sleeping ``datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`` (5 s) whenever a multi-shard
parquet stream ends: at the end of every pass, in every DataLoader worker (which exit without interpreter
teardown, where the abort happens). Work wrapped in ``arrow_threads_finish()`` defers those sleeps to one
wait at interpreter exit::

    with arrow_threads_finish():
        result = Trainer(config).train()

``Trainer.train`` and the streaming ``dinov2-hf`` commands (train, distill, eval, curate) do this.
"""

from __future__ import annotations

import atexit
import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager

_wait_registered = False


def _wait_for_arrow_threads() -> None:
    from datasets import config as datasets_config

    time.sleep(datasets_config.SLEEP_TIME_ON_THREADS_SHUTDOWN)


@contextmanager
def arrow_threads_finish() -> Iterator[None]:
    """Run the body with `datasets`' per-stream sleeps off (DataLoader workers forked inside inherit that);
    then, whether it returned or raised, restore them, collect the streams the body dropped (their scanners
    stop while Arrow is alive) and, once per process, register the wait `datasets` would have done at
    interpreter exit, before its teardown. An exception of the body propagates unchanged. Also a decorator
    (``@arrow_threads_finish()``); `datasets` is imported when the body runs, not before."""
    from datasets import config as datasets_config

    global _wait_registered
    sleep_time = datasets_config.SLEEP_TIME_ON_THREADS_SHUTDOWN
    datasets_config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    try:
        yield
    finally:
        datasets_config.SLEEP_TIME_ON_THREADS_SHUTDOWN = sleep_time
        gc.collect()  # the dropped stream iterators are freed, and stop their scanners
        if not _wait_registered:
            atexit.register(_wait_for_arrow_threads)
            _wait_registered = True
