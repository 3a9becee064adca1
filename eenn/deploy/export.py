"""Export a trained multi-exit network and a fitted policy as a bundle (:mod:`eenn.deploy.bundle`).

Each segment (stage k with exit k's head) is exported as its own ONNX graph with PyTorch's
``torch.export``-based exporter, with a dynamic batch axis and named inputs and outputs. The
export checks itself before the bundle appears: every graph is run in ONNX Runtime on a real
validation batch (and on its first sample alone, the batch axis' other end) and compared with
PyTorch; the largest differences and the tolerances go into the manifest, and a graph outside
them fails the export. The bundle is written into a temporary directory and renamed into place,
so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import eenn
from eenn.cost import CostProfile
from eenn.deploy.bundle import (
    BACKBONE,
    FORMAT,
    MANIFEST,
    POLICY_ARRAYS,
    POLICY_JSON,
    Bundle,
    exit_file,
    segment_file,
    sha256,
    stage_file,
)
from eenn.deploy.router import ROUTERS
from eenn.errors import EENNError
from eenn.models.multi_exit import Features, MultiExitNetwork
from eenn.policies.base import ExitPolicy

DEFAULT_OPSET = 18
EXPORTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


class _Part(nn.Module):
    """A stage and/or a head as one graph: stage k's input (one tensor or a multi-scale list) in,
    the stage's output (unless ``stage_out`` is False) and the head's logits (if any) out, flat."""

    def __init__(self, stage: nn.Module | None, head: nn.Module | None, stage_out: bool) -> None:
        super().__init__()
        self.stage, self.head, self.stage_out = stage, head, stage_out

    def forward(self, h: Features) -> tuple[torch.Tensor, ...]:
        if self.stage is not None:
            h = self.stage(h)
        out: list[torch.Tensor] = []
        if self.stage_out:
            out += list(h) if isinstance(h, (list, tuple)) else [h]
        if self.head is not None:
            out.append(self.head(h))
        return tuple(out)


def _names(prefix: str, h: Features) -> list[str]:
    return [prefix] if isinstance(h, torch.Tensor) else [f"{prefix}_{i}" for i in range(len(h))]


def _flat(h: Features) -> list[torch.Tensor]:
    return [h] if isinstance(h, torch.Tensor) else list(h)


def _export_graph(module: nn.Module, h: Features, path: Path, input_names: list[str], output_names: list[str],
                  opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    dynamic = {"h": {0: batch} if isinstance(h, torch.Tensor) else [{0: batch}] * len(h)}
    # the exporter and its optimiser log every rewrite at INFO (about 30 lines a graph under the
    # apps' logging config): an export prints its summary, not theirs
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        for log in loggers:
            log.setLevel(logging.WARNING)
        try:
            torch.onnx.export(module, (h,), str(path), input_names=input_names, output_names=output_names,
                              opset_version=opset, dynamo=True, dynamic_shapes=dynamic, external_data=False,
                              verbose=False, optimize=True)
        except Exception as exc:  # the exporter raises many types; the first line says what it could not trace
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EENNError(f"exporting {path.name} to ONNX failed: {reason}") from exc
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)


class _Checker:
    """Runs each exported graph in ONNX Runtime beside PyTorch and keeps the largest differences."""

    def __init__(self, atol: float, rtol: float) -> None:
        import onnxruntime as ort

        self.ort, self.atol, self.rtol = ort, atol, rtol
        self.graphs: dict[str, dict[str, float]] = {}

    def export(self, module: nn.Module, h: Features, path: Path, input_names: list[str], output_names: list[str],
               opset: int, expected: Sequence[torch.Tensor]) -> None:
        """Export ``module`` on input ``h`` to ``path`` and check it against ``expected``."""
        _export_graph(module, h, path, input_names, output_names, opset)
        self.check(path, _flat(h), expected)

    def check(self, path: Path, inputs: list[torch.Tensor], expected: Sequence[torch.Tensor]) -> None:
        session = self.ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        worst: dict[str, float] = {}
        for rows in (slice(None), slice(0, 1)):  # the whole batch, and one sample alone
            feeds = {i.name: t[rows].numpy() for i, t in zip(session.get_inputs(), inputs)}
            for name, got, want in zip(names, session.run(None, feeds), expected):
                want = want[rows].numpy()
                if got.shape != want.shape:
                    raise EENNError(f"{path.name}'s output {name!r} has shape {got.shape} in ONNX Runtime, "
                                    f"PyTorch gives {want.shape}.")
                err = np.abs(got.astype(np.float64) - want)
                bad = err > self.atol + self.rtol * np.abs(want)
                worst[name] = max(worst.get(name, 0.0), float(err.max()))
                if bad.any():
                    raise EENNError(
                        f"{path.name}'s output {name!r} differs from PyTorch by up to {float(err.max()):.3g} on a "
                        f"validation batch, beyond the tolerance atol={self.atol:g} + rtol={self.rtol:g}·|value|; "
                        "raise check.atol/check.rtol if that is acceptable."
                    )
        self.graphs[path.name] = worst


def check_exportable(policy: ExitPolicy, network: MultiExitNetwork) -> None:
    """Refuse, by name, a policy the runtime cannot run."""
    if not policy.online:
        raise EENNError(f"policy {policy.name!r} reads the labels (an oracle), so it cannot be deployed; "
                        "export a policy fitted to run online (maxprob, eenet, ...).")
    if policy.name not in ROUTERS:
        raise EENNError(f"policy {policy.name!r} has no runtime router yet; exportable: {', '.join(sorted(ROUTERS))}.")
    if policy.num_exits != network.num_exits:
        raise EENNError(f"the policy was fitted on {policy.num_exits} exits but the network has {network.num_exits}.")


def export_bundle(
    network: MultiExitNetwork,
    policy: ExitPolicy,
    profile: CostProfile,
    batch: torch.Tensor,
    out_dir: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    normalisation: tuple[Sequence[float], Sequence[float]] | None = None,
    source: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    backbone: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    replace: bool = False,
) -> Bundle:
    """Write the bundle of ``network`` with ``policy`` into ``out_dir``; ``batch``: real validation
    inputs for the export's own check. ``out_dir`` must not exist or be empty, unless ``replace``:
    then a bundle there is swapped for the new one once the new one is complete."""
    check_exportable(policy, network)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not replace:
        raise EENNError(f"{str(out_dir)!r} is not empty: a bundle is written into a new directory.")
    network = network.cpu().eval()
    router = ROUTERS[policy.name]
    K = network.num_exits
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        checker = _Checker(atol, rtol)
        exits = []
        with torch.inference_mode():
            eager: list[Features] = [batch.float().cpu()]
            for k in range(K):
                eager.append(network.forward_stage(k, eager[-1]))
        for k in range(K):
            last = k == K - 1
            h_in, h_out = eager[k], eager[k + 1]
            in_names = ["image"] if k == 0 else _names("h_in", h_in)
            out_names = ([] if last else _names("h_out", h_out)) + ["logits"]
            with torch.inference_mode():
                logits = network.forward_exit(k, h_out)
            checker.export(_Part(network.stages[k], network.heads[k], not last), h_in, tmp / segment_file(k),
                           in_names, out_names, opset, ([] if last else _flat(h_out)) + [logits])
            if router.jumps and 0 < k < K - 1:
                checker.export(_Part(network.stages[k], None, True), h_in, tmp / stage_file(k), in_names,
                               _names("h_out", h_out), opset, _flat(h_out))
                checker.export(_Part(None, network.heads[k], False), h_out, tmp / exit_file(k), _names("h_in", h_out),
                               ["logits"], opset, [logits])
            e = profile.exits[k]
            exits.append({
                "name": network.exit_names[k], "segment": segment_file(k), "inputs": in_names, "outputs": out_names,
                "cost": {u: getattr(e, u) for u in ("macs", "flops", "params", "latency_ms")},
                "head_cost": {u: getattr(e, f"head_{u}") for u in ("macs", "flops", "params", "latency_ms")},
            })
        if backbone:  # its logits are the last segment's
            checker.export(_Backbone(network), eager[0], tmp / BACKBONE, ["image"], ["logits"], opset, [logits])

        params, arrays = router.export(policy)
        spec = {"name": policy.name, "num_exits": K, "num_classes": policy.num_classes, "params": params,
                "hparams": policy.hparams(), "cost_unit": policy.cost_unit, "budget": policy.budget}
        (tmp / POLICY_JSON).write_text(json.dumps(spec, indent=2, allow_nan=False) + "\n")
        if arrays:
            from safetensors.numpy import save_file

            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp / POLICY_ARRAYS))

        manifest = {
            "format": FORMAT,
            "eenn_version": eenn.__version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "opset": opset,
            "input": {"name": "image", "shape": list(batch.shape[1:]), "dtype": "float32", "layout": "NCHW",
                      "normalisation": None if normalisation is None else
                      {"scale": 1 / 255, "mean": list(normalisation[0]), "std": list(normalisation[1])}},
            "num_classes": policy.num_classes,
            "class_names": list(class_names) if class_names is not None else None,
            "exits": exits,
            "backbone": {"file": BACKBONE, "cost": dict(profile.backbone)} if backbone else None,
            "policy": {"name": policy.name, "file": POLICY_JSON, "arrays": POLICY_ARRAYS if arrays else None,
                       "jumps": router.jumps, "cost_unit": policy.cost_unit, "budget": policy.budget},
            "source": source or {},
            "check": {"batch_size": int(batch.shape[0]), "atol": atol, "rtol": rtol, "max_abs_error": checker.graphs},
            "files": {p.name: sha256(p) for p in sorted(tmp.iterdir())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
        os.chmod(tmp, 0o755)
        old = None
        if out_dir.exists():  # empty, or replace: out of the way only now that the new bundle is whole
            old = out_dir.with_name(f"{tmp.name}.old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle(out_dir)


class _Backbone(nn.Module):
    """The plain network, no early heads: the last exit's logits."""

    def __init__(self, network: MultiExitNetwork) -> None:
        super().__init__()
        self.network = network

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.network.forward_backbone(h),)
