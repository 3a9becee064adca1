"""The Hugging Face Hub transport of model dirs (:mod:`eenn.api`'s ``from_pretrained`` and
``push_to_hub``): huggingface_hub is an extra (``eenn[hub]``), imported here only, and every failure,
offline included, is one sentence."""

from __future__ import annotations

import os
from pathlib import Path

from eenn.errors import EENNError


def download(repo_id: str, revision: str | None, token: str | None, cache_dir: str | os.PathLike | None) -> Path:
    """A Hub model repo's files (from the Hub's cache when offline); every failure is one sentence."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:
        raise EENNError(
            f"model_id={repo_id!r} is not a local directory, and loading from the Hugging Face Hub needs "
            "huggingface_hub: pip install 'eenn[hub]'."
        ) from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        raise EENNError(
            f"model_id={repo_id!r} is not a local directory nor in the Hugging Face Hub's cache, and the Hub "
            "cannot be reached (offline, or HF_HUB_OFFLINE=1): give a local model dir, or load it once "
            "with network."
        ) from None
    except (HfHubHTTPError, ValueError, OSError) as exc:
        raise EENNError(
            f"model_id={repo_id!r} is not a local directory, and the Hugging Face Hub did not give it: "
            f"{str(exc).strip().splitlines()[0]}"
        ) from None


def push(
    path: Path,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload eenn model",
) -> str:
    """Upload the model dir ``path`` to the Hub repo ``repo_id`` (made if missing); its commit URL."""
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    except ImportError:
        raise EENNError("push_to_hub needs huggingface_hub: pip install 'eenn[hub]'.") from None
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=str(path), commit_message=commit_message)
    except OfflineModeIsEnabled:
        raise EENNError(
            f"push_to_hub: cannot upload to {repo_id!r} while offline (HF_HUB_OFFLINE=1); unset it "
            "on a machine with network."
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise EENNError(f"push_to_hub: uploading to {repo_id!r} failed: {str(exc).strip().splitlines()[0]}") from None
    return str(getattr(info, "commit_url", info))
