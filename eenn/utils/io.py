"""Atomic file writes: a crash never leaves a half-written file that a later stage reads as valid."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from eenn.errors import EENNError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """A JSON file's content; a missing or corrupt file is one EENNError naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise EENNError(f"{what} {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EENNError(f"{what} {str(path)!r} is not readable JSON (truncated or corrupt?): {exc}.") from None


def write_safetensors(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str]) -> Path:
    """A safetensors file written atomically (a crash never leaves a half-written one), the same
    bytes for the same content."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _sort_metadata(tmp)
    return path


def _sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its metadata in key order: safetensors writes
    the metadata map in a random order per process, so equal files would differ in their bytes.
    The same entries, serialised compactly as safetensors does, take the same length."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:
            fh.seek(8)
            fh.write(text.ljust(size))


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a missing, truncated or corrupt file is one
    EENNError naming ``what`` (e.g. "predictions file") and the path."""
    path = Path(path)
    if not path.is_file():
        raise EENNError(f"{what} {str(path)!r} does not exist.")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise EENNError(f"{what} {str(path)!r} is not a readable safetensors file "
                        f"(truncated or corrupt?): {str(exc).rstrip('.')}.") from None
    return tensors, metadata
