"""A deployment bundle on disk, read without PyTorch: the manifest, its checks, the policy.

A bundle directory (``eenn-export`` writes it) holds:

- ``segment_<k>.onnx``: stage k, its exit head and (but for the last exit) the policy's decision
  there; inputs: the previous stage's activation (the image for k = 0) and the samples' policy
  state (``state_in_<name>``, from exit 1 on); outputs: the next activation (none after the last
  stage), ``logits``, ``exit`` (bool), ``next_exit`` where the policy jumps, and the new state
  (``state_out_<name>``);
- for a policy that sends samples past exits (DEEx), ``stage_<k>.onnx`` and ``exit_<k>.onnx`` for
  the middle exits too: the same stage, and head with decision, apart, so that a sample can skip a head;
- ``backbone.onnx`` (optional): the plain network exported whole, the baseline a deployer would
  otherwise ship;
- ``policy.json`` and ``policy.safetensors``: the fitted policy the decisions were traced from, its
  parameters and tensors (a record: the runtime reads the decisions from the graphs);
- ``manifest.json``: input shape and dtype, normalisation, class and exit names, per-exit costs,
  the ONNX opset, the eenn version, the source run and fit, export's own check and a sha256 per file.

Every file is checked against its sha256 when the bundle is opened; a missing or changed file,
or a manifest without a key the runtime reads, is refused in one sentence naming it.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from eenn.errors import EENNError

# /2: the decisions are in the graphs (exit, next_exit and state outputs); /1 bundles routed in numpy
FORMAT = "eenn.bundle/2"
MANIFEST = "manifest.json"
BUNDLE_DIR = "bundle"  # where eenn-export writes the bundle in its run dir
POLICY_JSON = "policy.json"
POLICY_ARRAYS = "policy.safetensors"
BACKBONE = "backbone.onnx"


def segment_file(k: int) -> str:
    return f"segment_{k}.onnx"


def stage_file(k: int) -> str:
    return f"stage_{k}.onnx"


def exit_file(k: int) -> str:
    return f"exit_{k}.onnx"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# safetensors' dtype names and numpy's: the runtime reads the format itself, numpy being its one
# array dependency (the format is a little-endian u64 header length, a JSON header, raw bytes)
_DTYPES = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "BOOL": np.bool_}


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file, with numpy only."""
    data = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
            out[name] = (
                np.frombuffer(data[8 + n + a : 8 + n + b], dtype=dtype)
                .reshape(info["shape"])
                .astype(dtype.newbyteorder("="))
            )
        return out
    except (struct.error, ValueError, KeyError, TypeError) as exc:
        raise EENNError(
            f"{str(path)!r} is not a safetensors file this runtime reads ({type(exc).__name__}: {exc})."
        ) from None


class Bundle:
    """An exported bundle, checked when opened (``verify=False`` skips the sha256 checks)."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        path = Path(path)
        if not (path / MANIFEST).is_file() and (path / BUNDLE_DIR / MANIFEST).is_file():
            path = path / BUNDLE_DIR  # an eenn-export run dir: its bundle
        self.path = path
        if not (path / MANIFEST).is_file():
            raise EENNError(f"bundle {str(path)!r} has no {MANIFEST}: is it a directory eenn-export wrote?")
        try:
            self.manifest: dict[str, Any] = json.loads((path / MANIFEST).read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise EENNError(f"{str(path / MANIFEST)!r} is not valid JSON ({exc}).") from None
        if not isinstance(self.manifest, dict) or self.manifest.get("format") != FORMAT:
            got = self.manifest.get("format") if isinstance(self.manifest, dict) else type(self.manifest).__name__
            older = isinstance(got, str) and got.startswith("eenn.bundle/") and got < FORMAT
            raise EENNError(
                f"{str(path / MANIFEST)!r} has format {got!r}, expected {FORMAT!r}"
                + (": an older eenn-export wrote it; export the bundle again." if older else ".")
            )
        for key in ("files", "input", "exits", "num_classes", "policy"):
            if key not in self.manifest:
                raise EENNError(f"{str(path / MANIFEST)!r} lacks the key {key!r}.")
        if verify:
            self.verify()

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r})"

    def file(self, name: str) -> Path:
        """A file of the bundle that the manifest lists (else an EENNError naming it)."""
        if name not in self.manifest["files"]:
            raise EENNError(f"{str(self.path / MANIFEST)!r} does not list {name!r} under 'files'.")
        p = self.path / name
        if not p.is_file():
            raise EENNError(f"bundle {str(self.path)!r} lacks {name!r}, which its manifest lists.")
        return p

    def verify(self) -> None:
        """Every listed file is there with its sha256, and the files the runtime needs are listed."""
        files = self.manifest["files"]
        if not isinstance(files, dict):
            raise EENNError(f"{str(self.path / MANIFEST)!r}: 'files' must map file names to sha256 digests.")
        for name in self.required_files():
            if name not in files:
                raise EENNError(f"{str(self.path / MANIFEST)!r} does not list {name!r} under 'files'.")
        for name, digest in files.items():
            p = self.file(name)
            if sha256(p) != digest:
                raise EENNError(
                    f"{str(p)!r} does not match the sha256 its manifest records: the file was changed "
                    "after export; export the bundle again."
                )

    # ---------------------------------------------------------------- contents
    @property
    def num_exits(self) -> int:
        return len(self.manifest["exits"])

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.manifest["input"]["shape"])

    @property
    def exit_names(self) -> list[str]:
        return [e["name"] for e in self.manifest["exits"]]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.get("class_names") or [])

    def cost(self, unit: str = "macs") -> list[float]:
        """Each exit's cost through it (the backbone up to it plus the heads before it), in ``unit``."""
        return [float(e["cost"][unit]) for e in self.manifest["exits"]]

    @property
    def jumps(self) -> bool:
        """Whether the bundle's policy sends samples past exits (its stages and heads are also apart)."""
        return bool(self.manifest["policy"].get("jumps", False))

    def required_files(self) -> list[str]:
        K = self.num_exits
        names = [segment_file(k) for k in range(K)] + [POLICY_JSON]
        if self.jumps:
            names += [f(k) for k in range(1, K - 1) for f in (stage_file, exit_file)]
        return names

    @property
    def state_names(self) -> list[str]:
        """The policy's per-sample state, handed from each segment's ``state_out_<name>`` outputs to
        the next one's ``state_in_<name>`` inputs."""
        names = self.manifest["policy"].get("state", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise EENNError(f"{str(self.path / MANIFEST)!r}: 'policy.state' must be a list of names, got {names!r}.")
        return names

    def policy(self) -> dict[str, Any]:
        """The fitted policy the bundle's decisions were traced from: ``policy.json``, with its
        tensors (``policy.safetensors``) under ``arrays``."""
        spec_path = self.file(POLICY_JSON)
        try:
            spec = json.loads(spec_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise EENNError(f"{str(spec_path)!r} is not valid JSON ({exc}).") from None
        if not isinstance(spec, dict) or spec.get("name") != self.manifest["policy"].get("name"):
            got = spec.get("name") if isinstance(spec, dict) else type(spec).__name__
            raise EENNError(
                f"{str(spec_path)!r} names the policy {got!r}, but the manifest's graphs were exported "
                f"with {self.manifest['policy'].get('name')!r}."
            )
        arrays = read_arrays(self.file(POLICY_ARRAYS)) if POLICY_ARRAYS in self.manifest["files"] else {}
        return {**spec, "arrays": arrays}

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, C, H, W) in 0..255 -> the network's float32 input, with the training
        data's per-channel mean and std that the manifest records."""
        norm = self.manifest["input"].get("normalisation")
        if norm is None:
            raise EENNError(f"{str(self.path / MANIFEST)!r} records no input normalisation.")
        mean = np.asarray(norm["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(norm["std"], dtype=np.float32)[:, None, None]
        return ((images.astype(np.float32) / np.float32(255.0)) - mean) / std
