"""Where a pass over the data stands, so that a resumed run continues it without decoding what it skips.

Every multi-crop sample carries the DataLoader worker that made it and how many rows of that worker's
stream were consumed once it was made (bad images after it included). The trainer keeps, per worker, the
rows behind the batches it consumed, and which worker made the last one. On resume each worker skips its
rows before decoding them, and :func:`continue_in_order` puts the batches back in the order the
uninterrupted pass would have given: a DataLoader cycles over its workers from worker 0, skipping the
workers that ran out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass
class DataPosition:
    """Rows consumed per worker in the current pass, the worker of the last consumed batch, batches consumed."""

    rows: list[int] = field(default_factory=list)
    last_worker: int | None = None
    batches: int = 0

    def advance(self, worker: int, rows: int) -> None:
        """Record a consumed batch made by ``worker``, whose stream had then given ``rows`` rows."""
        self.rows += [0] * (worker + 1 - len(self.rows))
        self.rows[worker] = rows
        self.last_worker = worker
        self.batches += 1

    def to_dict(self) -> dict:
        return {"rows": list(self.rows), "last_worker": self.last_worker, "batches": self.batches}

    @classmethod
    def from_dict(cls, state: dict) -> DataPosition:
        return cls(list(state["rows"]), state["last_worker"], state["batches"])


def continue_in_order(batches: Iterable[dict], num_workers: int, last_worker: int | None) -> Iterator[dict]:
    """The batches of a DataLoader resumed mid-pass, reordered to continue after ``last_worker``'s batch.

    ``batches`` come from a loader whose workers skipped their consumed rows: it cycles over its live workers
    from worker 0, while the interrupted pass would have gone on with the next live worker after
    ``last_worker``. A worker the loader passes over in its cycle has run out. At most one batch per worker is
    held back.
    """
    if num_workers <= 1 or last_worker is None:
        yield from batches
        return
    queues: list[deque] = [deque() for _ in range(num_workers)]
    live = [True] * num_workers
    wanted, previous = (last_worker + 1) % num_workers, num_workers - 1  # the loader starts its cycle at worker 0

    def ready() -> Iterator[dict]:
        """Emit in the uninterrupted order while the wanted worker's next batch is known."""
        nonlocal wanted
        while any(queues) or any(live):
            if queues[wanted]:
                yield queues[wanted].popleft()
            elif live[wanted]:
                return  # its next batch is still to come
            wanted = (wanted + 1) % num_workers

    for batch in batches:
        worker = int(batch["worker"][0])
        skipped = (previous + 1) % num_workers
        while skipped != worker:  # passed over in the loader's cycle: that worker has no batch left
            live[skipped] = False
            skipped = (skipped + 1) % num_workers
        previous = worker
        queues[worker].append(batch)
        yield from ready()
    live = [False] * num_workers  # the loader is done: the rest, in order
    yield from ready()
