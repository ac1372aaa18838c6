"""Publish a run's backbone or a curated dataset on the Hub through huggingface_hub's own API.

Retries: huggingface_hub retries what it can retry safely with its ``http_backoff`` (exponential backoff,
up to 5 retries, on timeouts, network errors, 408/429/5xx): the "preupload" calls and, in the hf_xet
upload pipeline that ``upload_folder`` uses, the commit POST itself; hf_xet retries its own chunk uploads.
``create_repo`` / ``create_branch`` are single calls. Nothing here writes into the source: the upload is
staged in a separate folder, so a failed upload leaves the checkpoint and export as they were, and
rerunning the same command resumes (files already committed are skipped).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .staging import FORMATS, StagedUpload, stage_upload


@dataclass
class PushResult:
    """Where an upload went: the repo, the commit and, with ``create_pr``, the pull request."""

    repo_id: str
    repo_url: str
    commit_url: str | None
    pr_url: str | None
    files: list[str]


def check_repo_id(repo_id: str) -> None:
    """A ValueError naming the problem unless ``repo_id`` is a valid ``owner/name`` (or ``name``) Hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid repo id {repo_id!r}: {error} Use owner/name, e.g. my-user/dinov2-small-cifar.") from None


def resolve_token(token: str | None = None) -> str:
    """``token``, else huggingface_hub's own resolution (HF_TOKEN, then the `hf auth login` token file);
    a RuntimeError that says how to log in when there is none, or when offline mode is on."""
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise RuntimeError("HF_HUB_OFFLINE is set: pushing needs the Hub. Unset HF_HUB_OFFLINE (or use --dry-run to stage only).")
    token = token or get_token()
    if not token:
        raise RuntimeError(
            "no Hugging Face token: run `hf auth login` or set HF_TOKEN to a token with write access "
            "(https://huggingface.co/settings/tokens)."
        )
    return token


def check_target(repo_id: str, revision: str | None, create_pr: bool) -> None:
    """A ValueError for an invalid repo id, or for ``create_pr`` with a revision (pull requests target main)."""
    check_repo_id(repo_id)
    if create_pr and revision not in (None, "", "main"):
        raise ValueError(f"--create-pr opens the pull request against the default branch; drop --revision {revision} or --create-pr.")


@contextlib.contextmanager
def _upload_errors(repo_id: str) -> Iterator[None]:
    """huggingface_hub's HTTP errors as a RuntimeError that says nothing local changed and how to resume."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        yield
    except HfHubHTTPError as error:
        raise RuntimeError(
            f"upload to {repo_id} failed: {error}. Nothing local was changed; rerun the same command to resume."
        ) from error


def _create_target(api, repo_id: str, *, repo_type: str, private: bool, revision: str | None):
    """create_repo (exist_ok) and, for a revision that is a new branch name, create_branch; the RepoUrl."""
    repo_url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision and revision != "main" and not revision.startswith("refs/"):
        api.create_branch(repo_url.repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    return repo_url


def push_checkpoint(
    source: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    fmt: str = "both",
    token: str | None = None,
    commit_message: str | None = None,
    eval_results: list[str | Path] = (),
    dry_run: bool = False,
    staging_dir: str | Path | None = None,
) -> tuple[PushResult, StagedUpload]:
    """Publish SOURCE (a run's output_dir, its ``export/`` folder, an export subfolder or a
    ``checkpoint-<step>`` folder) to the model repo ``repo_id``.

    ``fmt``: ``stock`` (stock transformers at the root), ``ours`` (our format with heads at the root) or
    ``both`` (stock at the root, ours with heads in ``dinov2_hf/``). ``eval_results``: ``dinov2-hf eval
    --output`` JSON files for the card's model-index. ``dry_run`` stages only (into ``staging_dir`` when
    given, else a temporary folder) and returns what would be uploaded. Arguments, the token and offline
    mode are checked before anything is staged.
    """
    from huggingface_hub import HfApi

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    check_target(repo_id, revision, create_pr)
    if not dry_run:
        token = resolve_token(token)
    with tempfile.TemporaryDirectory(prefix="dinov2_hf_push_") as temporary:
        folder = Path(staging_dir) if staging_dir else Path(temporary) / "upload"
        staged = stage_upload(source, folder, fmt=fmt, repo_id=repo_id, eval_files=list(eval_results))
        if dry_run:
            return PushResult(repo_id, f"https://huggingface.co/{repo_id}", None, None, staged.files), staged
        step = f" (step {staged.steps})" if staged.steps is not None else ""
        message = commit_message or f"Upload DINOv2 backbone{step} with dinov2_hf"
        api = HfApi(token=token, library_name="dinov2_hf")
        with _upload_errors(repo_id):
            repo_url = _create_target(api, repo_id, repo_type="model", private=private, revision=revision)
            info = api.upload_folder(
                repo_id=repo_url.repo_id, repo_type="model", folder_path=folder, revision=revision or None,
                create_pr=create_pr or None, commit_message=message,
            )
    return PushResult(repo_url.repo_id, str(repo_url), info.commit_url, info.pr_url, staged.files), staged


def load_curated(curated_dir: str | Path):
    """The ``dinov2-hf curate`` output as a ``datasets.DatasetDict`` (a train split; the Image feature with the
    original bytes). A FileNotFoundError names what is missing."""
    from datasets import load_dataset

    folder = Path(curated_dir)
    shards = sorted((folder / "data").glob("train-*.parquet"))
    if not shards or not (folder / "README.md").is_file():
        raise FileNotFoundError(
            f"{folder} is not a `dinov2-hf curate` output (needs data/train-*.parquet and README.md): pass its output.output_dir."
        )
    return load_dataset("parquet", data_files={"train": [str(s) for s in shards]})


def push_dataset(
    curated_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
) -> tuple[PushResult, dict]:
    """Publish a curated dataset: its card and ``manifest.csv`` in one commit (which opens the pull request
    with ``create_pr``), then the images with ``datasets``' ``push_to_hub`` (parquet shards), which merges its
    ``dataset_info`` and ``configs`` into that card, keeping the curation card's text and metadata.

    Returns the result and a summary (``images``, ``shards``, ``files`` sent besides the shards);
    ``dry_run`` checks and summarises only (no token or network).
    """
    from huggingface_hub import HfApi

    check_target(repo_id, revision, create_pr)
    if not dry_run:
        token = resolve_token(token)
    dataset = load_curated(curated_dir)
    sidecars = [name for name in ("README.md", "manifest.csv") if (Path(curated_dir) / name).is_file()]
    summary = {"images": dataset["train"].num_rows, "shards": len(list((Path(curated_dir) / "data").glob("train-*.parquet"))),
               "files": sidecars}
    if dry_run:
        return PushResult(repo_id, f"https://huggingface.co/datasets/{repo_id}", None, None, sidecars), summary
    api = HfApi(token=token, library_name="dinov2_hf")
    message = commit_message or "Upload curated dataset with dinov2_hf"
    with _upload_errors(repo_id):
        repo_url = _create_target(api, repo_id, repo_type="dataset", private=private, revision=revision)
        repo_id = repo_url.repo_id
        first = api.upload_folder(
            repo_id=repo_id, repo_type="dataset", folder_path=curated_dir, allow_patterns=sidecars,
            revision=None if create_pr else revision, create_pr=create_pr or None, commit_message=f"{message}: dataset card",
        )
        # datasets reads the card just committed from the Hub and adds its metadata to it.
        info = dataset.push_to_hub(repo_id, token=token, revision=first.pr_revision if create_pr else revision,
                                   commit_message=message, private=private)
    return PushResult(repo_id, str(repo_url), info.commit_url, first.pr_url, sidecars), summary
