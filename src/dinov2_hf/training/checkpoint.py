"""Atomic, resumable checkpoint folders: ``<root>/checkpoint-<step>``.

A checkpoint is written into a temporary sibling folder, marked complete, then renamed into place
(``os.replace`` is atomic on one filesystem). A crash mid-write leaves only a ``.tmp-`` folder that
is ignored and cleaned up later, never a half checkpoint under the final name; the previous
checkpoints are untouched until the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .run_dir import COMPLETE_MARKER, TEMPORARY_PREFIXES, checkpoint_name, list_checkpoints


@contextlib.contextmanager
def atomic_checkpoint(
    root: str | Path, step: int, is_main_process: bool = True, wait_for_everyone: Callable[[], None] = lambda: None
) -> Iterator[Path]:
    """Yield a temporary folder to write checkpoint ``step`` into; on success it becomes
    ``root/checkpoint-<step>`` (replacing an older one of the same step), on error it is removed.

    With several processes every rank calls this (``wait_for_everyone`` is a barrier): all ranks
    write into the same temporary folder, and the main process alone creates and renames it, after
    every rank has finished writing.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    temporary = root / f"{TEMPORARY_PREFIXES[0]}{step}"
    if is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)  # left over by a crash at this very step
        temporary.mkdir()
    wait_for_everyone()
    try:
        yield temporary
        wait_for_everyone()
        if is_main_process:
            (temporary / COMPLETE_MARKER).write_text(str(step))
            if final.exists():
                backup = root / f"{TEMPORARY_PREFIXES[1]}{step}-{uuid.uuid4().hex[:8]}"
                os.replace(final, backup)
                os.replace(temporary, final)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(temporary, final)
        wait_for_everyone()
    except BaseException:
        if is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        raise


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints and any leftover temporary
    folders of interrupted writes; returns what was removed."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}.")
    root = Path(root)
    removed = list_checkpoints(root)[:-keep_last]
    if root.is_dir():
        removed += [p for p in root.iterdir() if p.name.startswith(TEMPORARY_PREFIXES)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed
