"""Atomic file writes: a crash never leaves a half-written file that a later stage reads as valid."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
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


@contextlib.contextmanager
def _readable(path: Path, what: str) -> Iterator[None]:
    """Turn a missing, truncated or corrupt safetensors file into one EENNError naming ``what``."""
    if not path.is_file():
        raise EENNError(f"{what} {str(path)!r} does not exist.")
    try:
        yield
    except (SafetensorError, OSError, ValueError) as exc:
        raise EENNError(
            f"{what} {str(path)!r} is not a readable safetensors file (truncated or corrupt?): {str(exc).rstrip('.')}."
        ) from None


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a missing, truncated or corrupt file is one
    EENNError naming ``what`` (e.g. "predictions file") and the path."""
    path = Path(path)
    with _readable(path, what):
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    return tensors, metadata


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def map_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str], mmap.mmap]:
    """Like :func:`read_safetensors`, but every tensor is a view of one copy-on-write memory map of
    the file (returned too): pages are read when touched, and ``mmap.madvise(MADV_DONTNEED)``
    hands them back (they are read again from the page cache if touched again). In-place changes
    stay in this process and are lost where pages are handed back."""
    path = Path(path)
    with _readable(path, what), safe_open(str(path), framework="pt") as fh:  # it checks header and offsets
        metadata = fh.metadata() or {}
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    size = int.from_bytes(mm[:8], "little")
    header = json.loads(mm[8 : 8 + size])
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise EENNError(
                f"{what} {str(path)!r} holds tensor {name!r} of dtype {entry['dtype']}, expected one of "
                f"{sorted(_DTYPES)}."
            )
        begin, end = (8 + size + o for o in entry["data_offsets"])
        shape = entry["shape"]
        if end == begin:  # frombuffer refuses empty views
            tensors[name] = torch.empty(shape, dtype=dtype)
        elif begin % dtype.itemsize:  # a misaligned view would be slow or refused: copy it
            tensors[name] = torch.frombuffer(bytearray(mm[begin:end]), dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(
                mm, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=begin
            ).reshape(shape)
    return tensors, metadata, mm
