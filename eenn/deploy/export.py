"""Export a trained multi-exit network and a fitted policy as a bundle (:mod:`eenn.deploy.bundle`).

Each segment (stage k with exit k's head and, but for the last, the policy's decision at exit k)
is exported as its own ONNX graph with PyTorch's ``torch.export``-based exporter, with a dynamic
batch axis and named inputs and outputs. The decision is the policy's own ``decide``, traced: the
runtime reads ``exit`` (and where the policy jumps, ``next_exit``) and hands the samples' state on
to the next graph, and decides nothing itself. The
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
from eenn.errors import EENNError
from eenn.models.multi_exit import Features, MultiExitNetwork
from eenn.policies.base import Decision, ExitPolicy

DEFAULT_OPSET = 18
EXPORTER_LOGGERS = ("torch.onnx", "onnxscript", "onnx_ir")


class _Decision(nn.Module):
    """Exit k's decision, the fitted policy's own :meth:`~eenn.policies.base.ExitPolicy.decide`
    traced into the graph: one definition of each rule, and a request pays ONNX Runtime's few
    small operators after the head instead of a round of Python and numpy calls between graphs.

    Inputs: the head's logits and the samples' state (none at exit 0: the policy's initial state
    is built in the graph); outputs: ``exit`` (B,) bool, ``next_exit`` (B,) int64 where the policy
    jumps, and the new state, each named ``state_out_<name>``."""

    def __init__(self, policy: ExitPolicy, k: int) -> None:
        super().__init__()
        self.policy, self.k = policy, k
        self.state_names = state_names(policy)

    def forward(self, logits: torch.Tensor, state: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        st = dict(zip(self.state_names, state)) if self.k else self.policy.init_state(logits.shape[0])
        return self.outputs(self.policy.decide(self.k, logits, st))

    def outputs(self, d: Decision) -> list[torch.Tensor]:
        """A decision as the graph's outputs, in :meth:`output_names`' order."""
        return [d.exit] + ([d.next_exit] if self.policy.jumps else []) + [d.state[n] for n in self.state_names]

    def output_names(self) -> list[str]:
        return ["exit"] + (["next_exit"] if self.policy.jumps else []) + [f"state_out_{n}" for n in self.state_names]

    def input_names(self) -> list[str]:
        return [f"state_in_{n}" for n in self.state_names] if self.k else []


def state_names(policy: ExitPolicy) -> list[str]:
    """The names of a policy's per-sample state tensors, in the order the graphs take them."""
    return sorted(policy.init_state(1))


class _Part(nn.Module):
    """A stage and/or a head as one graph: stage k's input (one tensor or a multi-scale list) in,
    the stage's output (unless ``stage_out`` is False), the head's logits (if any) and the
    decision's outputs (if any) out, flat."""

    def __init__(
        self, stage: nn.Module | None, head: nn.Module | None, stage_out: bool, decision: _Decision | None = None
    ) -> None:
        super().__init__()
        self.stage, self.head, self.stage_out, self.decision = stage, head, stage_out, decision

    def forward(self, h: Features, state: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, ...]:
        if self.stage is not None:
            h = self.stage(h)
        out: list[torch.Tensor] = []
        if self.stage_out:
            out += list(h) if isinstance(h, (list, tuple)) else [h]
        if self.head is not None:
            out.append(self.head(h))
            if self.decision is not None:
                out += self.decision(out[-1], state)
        return tuple(out)


def _names(prefix: str, h: Features) -> list[str]:
    return [prefix] if isinstance(h, torch.Tensor) else [f"{prefix}_{i}" for i in range(len(h))]


def _flat(h: Features) -> list[torch.Tensor]:
    return [h] if isinstance(h, torch.Tensor) else list(h)


def _export_graph(
    module: nn.Module, args: tuple[Any, ...], path: Path, input_names: list[str], output_names: list[str], opset: int
) -> None:
    batch = torch.export.Dim("batch", min=1)
    h = args[0]
    dynamic: dict[str, Any] = {"h": {0: batch} if isinstance(h, torch.Tensor) else [{0: batch}] * len(h)}
    if len(args) > 1:  # the decision's state, batch-first
        dynamic["state"] = tuple({0: batch} for _ in args[1])
    # the exporter and its optimiser log every rewrite at INFO (about 30 lines a graph under the
    # apps' logging config): an export prints its summary, not theirs
    loggers = [logging.getLogger(name) for name in EXPORTER_LOGGERS]
    levels = [log.level for log in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        for log in loggers:
            log.setLevel(logging.WARNING)
        try:
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic,
                external_data=False,
                verbose=False,
                optimize=True,
            )
        except Exception as exc:  # the exporter raises many types; the first line says what it could not trace
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EENNError(f"exporting {path.name} to ONNX failed: {reason}") from exc
        finally:
            for log, level in zip(loggers, levels):
                log.setLevel(level)
    import onnx  # the exporter's own dependency

    # an opset it cannot convert to is logged and left at the exporter's own: the manifest would lie
    written = next((o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise EENNError(
            f"opset={opset}: the exporter wrote {path.name} at opset {written}; choose an opset it converts to."
        )


#: how many samples of a validation batch an exported decision (a bool or integer output) may
#: differ from PyTorch on: a score on its threshold, or two classes tied for the argmax, can tip
#: either way under ONNX Runtime's float rounding; more than 1 % of the batch (at least one
#: sample) is a wrong graph, not a tie
MAX_DECISIONS_DIFFERING = 0.01


class _Checker:
    """Runs each exported graph in ONNX Runtime beside PyTorch and keeps the largest differences."""

    def __init__(self, atol: float, rtol: float) -> None:
        import onnxruntime as ort

        self.ort, self.atol, self.rtol = ort, atol, rtol
        self.graphs: dict[str, dict[str, float]] = {}

    def export(
        self,
        module: nn.Module,
        args: tuple[Any, ...],
        path: Path,
        input_names: list[str],
        output_names: list[str],
        opset: int,
        expected: Sequence[torch.Tensor],
    ) -> None:
        """Export ``module`` on ``args`` to ``path`` and check it against ``expected``."""
        _export_graph(module, args, path, input_names, output_names, opset)
        self.check(path, _flat(args[0]) + (list(args[1]) if len(args) > 1 else []), expected)

    def check(self, path: Path, inputs: list[torch.Tensor], expected: Sequence[torch.Tensor]) -> None:
        session = self.ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        worst: dict[str, float] = {}
        for rows in (slice(None), slice(0, 1)):  # the whole batch, and one sample alone
            feeds = {i.name: t[rows].numpy() for i, t in zip(session.get_inputs(), inputs)}
            try:
                outs = session.run(None, feeds)
            except Exception as exc:  # onnxruntime's own exception types; a fixed batch axis, typically
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise EENNError(
                    f"{path.name} does not run in ONNX Runtime on {len(inputs[0][rows])} validation samples ({reason})."
                ) from None
            for name, got, want in zip(names, outs, expected):
                want = want[rows].numpy()
                if got.shape != want.shape:
                    raise EENNError(
                        f"{path.name}'s output {name!r} has shape {got.shape} in ONNX Runtime, "
                        f"PyTorch gives {want.shape}."
                    )
                if want.dtype.kind in "biu":  # a decision: equal, but for ties
                    differ = int((got != want).reshape(len(want), -1).any(1).sum())
                    worst[name] = max(worst.get(name, 0.0), differ / len(want))
                    if differ > max(1, int(MAX_DECISIONS_DIFFERING * len(want))):
                        raise EENNError(
                            f"{path.name}'s output {name!r} differs from PyTorch on {differ} of "
                            f"{len(want)} validation samples, more than ties explain: the policy's "
                            "decision does not export faithfully."
                        )
                    continue
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
        raise EENNError(
            f"policy {policy.name!r} reads the labels (an oracle), so it cannot be deployed; "
            "export a policy fitted to run online (maxprob, eenet, ...)."
        )
    if policy.num_exits != network.num_exits:
        raise EENNError(f"the policy was fitted on {policy.num_exits} exits but the network has {network.num_exits}.")


def _walk_decisions(
    policy: ExitPolicy, logits: list[torch.Tensor]
) -> list[tuple[dict[str, torch.Tensor], list[torch.Tensor]]]:
    """For exits 0..K-2: the state every sample of the check batch holds on reaching exit k, had
    each been sent there, and the decision's outputs from it (the graphs' inputs and expected outputs)."""
    K = len(logits)
    state = policy.init_state(logits[0].shape[0])
    out = []
    with torch.inference_mode():
        for k in range(K - 1):
            d = policy.decide(k, logits[k], state)
            out.append((state, _Decision(policy, k).outputs(d)))
            state = d.state
    return out


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
    policy = policy.to("cpu")
    K = network.num_exits
    names = state_names(policy)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        checker = _Checker(atol, rtol)
        exits = []
        with torch.inference_mode():
            # contiguous: a channels-last batch (as image loaders give) is traced with its strides,
            # and every head's flatten then exports as index arithmetic and a gather (8 operators)
            eager: list[Features] = [batch.float().cpu().contiguous()]
            for k in range(K):
                eager.append(network.forward_stage(k, eager[-1]))
            all_logits = [network.forward_exit(k, eager[k + 1]) for k in range(K)]
        decisions = _walk_decisions(policy, all_logits)
        for k in range(K):
            last = k == K - 1
            h_in, h_out, logits = eager[k], eager[k + 1], all_logits[k]
            # the last exit always answers: its segment holds no decision; exit 0 builds the state
            decision = None if last else _Decision(policy, k)
            state_in = [decisions[k][0][n] for n in names] if decision is not None and k else []
            decided = decisions[k][1] if decision is not None else []
            args = (h_in, tuple(state_in)) if state_in else (h_in,)
            in_names = ["image"] if k == 0 else _names("h_in", h_in)
            out_names = ([] if last else _names("h_out", h_out)) + ["logits"]
            if decision is not None:
                in_names, out_names = in_names + decision.input_names(), out_names + decision.output_names()
            checker.export(
                _Part(network.stages[k], network.heads[k], not last, decision),
                args,
                tmp / segment_file(k),
                in_names,
                out_names,
                opset,
                ([] if last else _flat(h_out)) + [logits] + decided,
            )
            if policy.jumps and 0 < k < K - 1:
                checker.export(
                    _Part(network.stages[k], None, True),
                    (h_in,),
                    tmp / stage_file(k),
                    in_names[: len(_flat(h_in))],
                    _names("h_out", h_out),
                    opset,
                    _flat(h_out),
                )
                checker.export(
                    _Part(None, network.heads[k], False, decision),
                    (h_out, tuple(state_in)) if state_in else (h_out,),
                    tmp / exit_file(k),
                    _names("h_in", h_out) + decision.input_names(),
                    ["logits"] + decision.output_names(),
                    opset,
                    [logits] + decided,
                )
            e = profile.exits[k]
            exits.append(
                {
                    "name": network.exit_names[k],
                    "segment": segment_file(k),
                    "inputs": in_names,
                    "outputs": out_names,
                    "cost": {u: getattr(e, u) for u in ("macs", "flops", "params", "latency_ms")},
                    "head_cost": {u: getattr(e, f"head_{u}") for u in ("macs", "flops", "params", "latency_ms")},
                }
            )
        if backbone:  # its logits are the last segment's
            checker.export(_Backbone(network), (eager[0],), tmp / BACKBONE, ["image"], ["logits"], opset, [logits])

        # what the decisions in the graphs were traced from: the fitted policy's parameters and tensors
        arrays = {k: v.detach().cpu().numpy() for k, v in policy.tensors().items()}
        if policy.temperature is not None:
            arrays["temperature"] = policy.temperature.detach().cpu().numpy()
        spec = {
            "name": policy.name,
            "num_exits": K,
            "num_classes": policy.num_classes,
            "hparams": policy.hparams(),
            "cost_unit": policy.cost_unit,
            "budget": policy.budget,
            "state": names,
            "jumps": policy.jumps,
        }
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
            "input": {
                "name": "image",
                "shape": list(batch.shape[1:]),
                "dtype": "float32",
                "layout": "NCHW",
                "normalisation": None
                if normalisation is None
                else {"scale": 1 / 255, "mean": list(normalisation[0]), "std": list(normalisation[1])},
            },
            "num_classes": policy.num_classes,
            "class_names": list(class_names) if class_names is not None else None,
            "exits": exits,
            "backbone": {"file": BACKBONE, "cost": dict(profile.backbone)} if backbone else None,
            "policy": {
                "name": policy.name,
                "file": POLICY_JSON,
                "arrays": POLICY_ARRAYS if arrays else None,
                "jumps": policy.jumps,
                "state": names,
                "cost_unit": policy.cost_unit,
                "budget": policy.budget,
            },
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
