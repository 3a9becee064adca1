"""The work of ``eenn-infer``: a stage-1 run's network and a fitted policy, run for real.

Loads the run (config, checkpoint, cost profile, saved predictions), runs the engine over a split
(batched, rebatched or one sample per request), times the plain backbone on the same inputs,
and writes ``infer.json``: accuracy, the Distiller-style cost table expected (offline simulation on
the saved predictions) and realised (the exits the engine took), their agreement, wall-time
speedup, per-request latency, and the edge/cloud partition simulation (with DEEx's p_d curve when
the policy is ``deex``).
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.inference.edge_cloud import Link, deex_time_curve, edge_cloud_report, measure_partition
from eenn.inference.engine import EarlyExitEngine, ExitResult, batches_of, time_backbone
from eenn.inference.rebatch import Rebatcher
from eenn.inference.report import UNITS, cost_report, format_report
from eenn.models.multi_exit import MultiExitNetwork
from eenn.policies.base import ExitPolicy
from eenn.policies.fitting import POLICY_FILE
from eenn.policies.simulate import simulate
from eenn.predictions import Predictions
from eenn.utils.io import write_json

MODES = ("batched", "rebatch", "single")


def resolve_policy_file(cfg: DictConfig) -> Path:
    if cfg.get("policy_file"):
        path = Path(cfg.policy_file)
        if not path.is_file():
            raise EENNError(f"policy_file={str(path)!r} does not exist.")
        return path
    if cfg.get("policy_dir"):
        path = Path(cfg.policy_dir) / POLICY_FILE
        if not path.is_file():
            raise EENNError(f"policy_dir={str(cfg.policy_dir)!r} holds no {POLICY_FILE}: it is not an eenn-fit run dir.")
        return path
    raise EENNError("no policy: set policy_dir=<eenn-fit run dir> or policy_file=<policy.safetensors>.")


def _number(value: Any, key: str, minimum: float, strict: bool, integer: bool = False) -> Any:
    """``value`` if it is a finite number (an integer if ``integer``) above ``minimum`` (at or above
    it unless ``strict``); otherwise an EENNError naming ``key``."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise EENNError(f"{key} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}.")
    return value


def check_config(cfg: DictConfig) -> None:
    """Refuse bad settings before loading anything, each with one sentence naming its key."""
    if cfg.mode not in MODES:
        raise EENNError(f"mode must be one of {MODES}, got {cfg.mode!r}.")
    _number(cfg.batch_size, "batch_size", 1, strict=False, integer=True)
    if cfg.get("threads") is not None:
        _number(cfg.threads, "threads", 1, strict=False, integer=True)
    if cfg.split not in ("val", "test"):
        raise EENNError(f"split must be 'val' or 'test', got {cfg.split!r}.")
    if cfg.report_unit not in UNITS:
        raise EENNError(f"report_unit must be one of {UNITS}, got {cfg.report_unit!r}.")
    try:
        device = torch.device(str(cfg.device))
    except RuntimeError:
        raise EENNError(f"device={cfg.device!r} is not a torch device (cpu, cuda, cuda:1, ...).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EENNError(f"device={cfg.device!r} but CUDA is not available here; use device=cpu.")
    ec = cfg.edge_cloud
    if not ec.enabled:
        return
    if ec.split is not None:
        _number(ec.split, "edge_cloud.split", -1, strict=False, integer=True)
    _number(ec.bandwidth_mbps, "edge_cloud.bandwidth_mbps", 0, strict=True)
    _number(ec.rtt_ms, "edge_cloud.rtt_ms", 0, strict=False)
    _number(ec.cloud_speedup, "edge_cloud.cloud_speedup", 0, strict=True)
    _number(ec.bytes_per_element, "edge_cloud.bytes_per_element", 1, strict=False, integer=True)
    _number(ec.latency_batch_size, "edge_cloud.latency_batch_size", 1, strict=False, integer=True)
    _number(ec.repeats, "edge_cloud.repeats", 1, strict=False, integer=True)
    for p_d in ec.p_d_sweep or []:
        if isinstance(p_d, bool) or not isinstance(p_d, (int, float)) or not 0.0 <= p_d <= 1.0:
            raise EENNError(f"edge_cloud.p_d_sweep entries must be probabilities in [0, 1], got {p_d!r}.")


def resolve_run_dir(cfg: DictConfig) -> Path:
    """``run_dir``, or else the stage-1 run the policy dir was fitted on (its saved config says)."""
    if cfg.get("run_dir"):
        run_dir = Path(cfg.run_dir)
    else:
        fit_cfg = Path(cfg.policy_dir or "") / ".hydra" / "config.yaml"
        fitted_on = OmegaConf.load(fit_cfg).get("run_dir") if cfg.get("policy_dir") and fit_cfg.is_file() else None
        if not fitted_on:
            raise EENNError("no run_dir: set run_dir=<stage-1 run dir> (the policy dir does not name the run it was fitted on).")
        run_dir = Path(fitted_on)
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise EENNError(f"run_dir={str(run_dir)!r} is not a stage-1 run dir (no .hydra/config.yaml in it).")
    return run_dir


def checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    path = run_dir / "checkpoints" / f"{checkpoint}.ckpt" if checkpoint in ("best", "last") else Path(checkpoint)
    if not path.is_file():
        raise EENNError(f"checkpoint={checkpoint!r}: {str(path)!r} does not exist.")
    return path


def load_network(train_cfg: DictConfig, dm: Any, ckpt: Path) -> MultiExitNetwork:
    """Rebuild the run's network from its config and load the checkpoint's weights (no pickle)."""
    from eenn.training.run import build_network

    network = build_network(train_cfg, dm)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "network."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        raise EENNError(f"checkpoint {str(ckpt)!r} does not fit the network its run's config builds: {str(exc).splitlines()[0]}") from None
    return network.eval()


def load_split(dm: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split in memory, so that timing measures the network, not the data pipeline."""
    xs, ys = zip(*dm.split_loader(split))
    return torch.cat(xs), torch.cat(ys)


def _quantiles(t: torch.Tensor) -> dict[str, float]:
    return {"mean": float(t.mean()), "p50": float(t.quantile(0.5)), "p95": float(t.quantile(0.95)), "max": float(t.max())}


def timing_summary(result: ExitResult, backbone_s: float | None) -> dict[str, Any]:
    n = result.num_samples
    out: dict[str, Any] = {
        "engine_s": result.wall_s,
        "ms_per_sample": 1e3 * result.wall_s / n,
        "latency_ms": _quantiles(result.latency_ms),
        "policy_s": result.policy_s,
        "stage_batches": [{"count": len(b), "mean_size": (sum(b) / len(b)) if b else None} for b in result.stage_batch_sizes],
        "backbone_s": backbone_s,
        "realised_speedup": None,
        "policy_overhead_pct": None,
    }
    if backbone_s:
        out["realised_speedup"] = backbone_s / result.wall_s
        out["policy_overhead_pct"] = 100 * result.policy_s / backbone_s
    return out


def infer(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the engine as ``cfg`` (conf/infer.yaml) says; write and return ``infer.json``'s content.
    ``threads`` holds for this call only: the jobs of a multirun share one process."""
    check_config(cfg)
    threads = torch.get_num_threads()
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))
    try:
        return _infer(cfg, Path(out_dir))
    finally:
        torch.set_num_threads(threads)


def _infer(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    policy_file = resolve_policy_file(cfg)
    policy = ExitPolicy.load(policy_file)
    run_dir = resolve_run_dir(cfg)
    train_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    train_cfg.data = OmegaConf.merge(train_cfg.data, cfg.get("data") or {})
    dm = hydra.utils.instantiate(train_cfg.data, _convert_="all")
    dm.setup("test")
    network = load_network(train_cfg, dm, checkpoint_path(run_dir, str(cfg.checkpoint)))
    costs_file = run_dir / "costs.json"
    if not costs_file.is_file():
        raise EENNError(f"run_dir={str(run_dir)!r} has no costs.json: was its training run finished?")
    profile = CostProfile.from_dict(json.loads(costs_file.read_text()))
    unit = str(cfg.report_unit)
    if profile.backbone.get(unit) is None:
        raise EENNError(f"report_unit={unit!r}: the run's cost profile has none (latency is measured only when "
                        f"training ran with cost.latency=true); use report_unit=macs or flops.")
    preds = Predictions.load(run_dir / "predictions" / f"{cfg.split}.safetensors")
    x, y = load_split(dm, cfg.split)
    if preds.num_samples != len(y) or not torch.equal(preds.labels, y):
        raise EENNError(
            f"the {cfg.split} split ({len(y)} samples) does not match the run's saved predictions "
            f"({preds.num_samples}); were data overrides given that change the split?"
        )
    if policy.num_exits != preds.num_exits:
        raise EENNError(f"policy file {str(policy_file)!r} was fitted on {policy.num_exits} exits; run_dir's network has {preds.num_exits}.")

    ec = cfg.edge_cloud
    split = network.num_exits - 2 if ec.split is None else int(ec.split)
    if ec.enabled and not -1 <= split < network.num_exits:
        raise EENNError(f"edge_cloud.split={split} must lie in -1..{network.num_exits - 1} (the stage after which to cut).")

    engine = EarlyExitEngine(network, policy, device=cfg.device)
    bs = 1 if cfg.mode == "single" else int(cfg.batch_size)
    runner = Rebatcher(engine, bs).run if cfg.mode == "rebatch" else engine.run
    runner(batches_of(x[:bs], bs))  # warm-up: first calls allocate and pick kernels
    result = runner(batches_of(x, bs, y))
    backbone_s = None
    if cfg.backbone_baseline:
        time_backbone(engine.network, batches_of(x[:bs], bs))  # its warm-up
        backbone_s = time_backbone(engine.network, batches_of(x, bs))

    expected_idx, expected_heads = simulate(policy, preds.logits, preds.labels)
    expected_pred = preds.logits[torch.arange(preds.num_samples), expected_idx].argmax(-1)
    reports = {
        "expected": cost_report(profile, expected_idx, expected_heads, unit),
        "realised": cost_report(profile, result.exit_index, result.heads_evaluated, unit),
    }
    out: dict[str, Any] = {
        "run_dir": str(run_dir),
        "policy_file": str(policy_file),
        "policy": {"name": policy.name, "cost_unit": policy.cost_unit, "budget": policy.budget, "info": policy.info},
        "split": cfg.split,
        "num_samples": result.num_samples,
        "mode": cfg.mode,
        "batch_size": bs,
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "accuracy": {"expected": float((expected_pred == preds.labels).double().mean()), "realised": result.accuracy()},
        "agreement": {
            "exit_index": float((expected_idx == result.exit_index).double().mean()),
            "predictions": float((expected_pred == result.predictions).double().mean()),
        },
        "exit_fractions": {k: [e["fraction"] for e in r["exits"]] for k, r in reports.items()},
        "cost_report": reports,
        "timing": timing_summary(result, backbone_s),
        "edge_cloud": None,
    }

    if ec.enabled:
        partition = measure_partition(
            engine.network, dm.input_shape, split,
            Link(float(ec.bandwidth_mbps), float(ec.rtt_ms)), float(ec.cloud_speedup),
            int(ec.latency_batch_size), int(ec.bytes_per_element), int(ec.repeats),
        )
        out["edge_cloud"] = edge_cloud_report(partition, result.exit_index, result.heads_evaluated, result.predictions, y)
        if policy.name == "deex" and ec.p_d_sweep:
            out["edge_cloud"]["p_d_curve"] = deex_time_curve(partition, preds, list(ec.p_d_sweep), policy.p_tar)

    write_json(out_dir / "infer.json", out)
    print(summary_text(out))
    return out


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_text(out: dict[str, Any]) -> str:
    """The cost table, expected vs realised, with accuracy, wall time and edge/cloud lines."""
    t = out["timing"]
    extra = [
        ("Accuracy", [fmt(out["accuracy"]["expected"], ".4f"), fmt(out["accuracy"]["realised"], ".4f")]),
        ("Same exit as offline simulation", ["", f"{100 * out['agreement']['exit_index']:.2f}%"]),
        ("Wall time engine / plain backbone (s)", ["", f"{t['engine_s']:.3f} / {fmt(t['backbone_s'], '.3f')}"]),
        ("Measured wall-time speedup", ["", fmt(t["realised_speedup"], ".3f")]),
        ("Policy overhead (% of backbone time)", ["", fmt(t["policy_overhead_pct"], ".3f")]),
    ]
    ec = out["edge_cloud"]
    if ec is not None:
        extra += [
            (f"Edge/cloud: split after stage {ec['partition']['split']}, mean ms/sample", ["", f"{ec['time_ms']['mean']:.3f}"]),
            ("Edge/cloud: offload ratio, MB sent", ["", f"{100 * ec['offload_ratio']:.2f}%, {ec['bytes_sent'] / 1e6:.3f}"]),
        ]
    head = (f"{out['policy']['name']} on {out['split']} ({out['num_samples']} samples), mode {out['mode']}, "
            f"batch {out['batch_size']}, {out['device']} x{out['threads']} threads")
    return head + "\n" + format_report(out["cost_report"], extra)
