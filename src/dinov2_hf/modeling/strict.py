"""Strict ``from_pretrained``: missing or unexpected weights are an error, not a log line.

transformers reports them in a warning and initialises every missing weight at random, so a truncated
checkpoint, or one of another architecture with the same config fields, loads into a model that runs and
gives wrong outputs. Every ``from_pretrained`` of weights in the package goes through here; state dicts
are loaded with ``load_state_dict(strict=True)`` (or checked alike, as in ``convert_meta.from_meta``).
"""

from __future__ import annotations

import re
from pathlib import Path

# How many key names a weights-mismatch error lists per kind: enough to see the pattern, short enough to read.
_KEYS_SHOWN = 8


def _key_list(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_KEYS_SHOWN])
    return f"{shown} (and {len(keys) - _KEYS_SHOWN} more)" if len(keys) > _KEYS_SHOWN else shown


def check_loading_info(info: dict, source: str | Path, model_class: str, ignore_unexpected: str | None = None) -> None:
    """Raise ValueError when ``from_pretrained(..., output_loading_info=True)`` reported missing or unexpected
    weights. transformers only logs them (a missing weight is silently randomly initialised), which turns a
    truncated or mismatched checkpoint into a model that runs and gives wrong outputs.

    ``ignore_unexpected``: a regular expression for checkpoint keys that are dropped on purpose (searched).
    """
    missing = set(info.get("missing_keys", ()))
    unexpected = {k for k in info.get("unexpected_keys", ()) if not (ignore_unexpected and re.search(ignore_unexpected, k))}
    if not missing and not unexpected:
        return
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {_key_list(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in the model: {_key_list(unexpected)}")
    raise ValueError(
        f"{source}: its weights do not match the {model_class} its config.json describes; "
        f"{'; '.join(problems)}. Refused: missing weights would be random and unexpected ones ignored, so the model "
        "would give wrong outputs. Re-save or re-convert the checkpoint."
    )


def from_pretrained_strict(model_class, source: str | Path, ignore_unexpected: str | None = None, **kwargs):
    """``model_class.from_pretrained(source, **kwargs)``, raising ValueError (:func:`check_loading_info`) where
    transformers would only log missing or unexpected weights."""
    model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    check_loading_info(info, source, model_class.__name__, ignore_unexpected)
    return model
