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
import platform
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from eenn.cost import CostProfile
from eenn.errors import EENNError
from eenn.evaluation.offline import simulate
from eenn.evaluation.predictions import Predictions
from eenn.inference.edge_cloud import Link, deex_time_curve, edge_cloud_report, measure_partition
from eenn.inference.engine import EarlyExitEngine, ExitResult, batches_of, time_backbone
from eenn.inference.rebatch import Rebatcher
from eenn.inference.report import cost_report, format_report
from eenn.models.multi_exit import MultiExitNetwork
from eenn.policies.base import ExitPolicy
from eenn.policies.fitting import POLICY_FILE
from eenn.utils.io import write_json

MODES = ("batched", "rebatch", "single")


def resolve_policy_file(cfg: DictConfig) -> Path:
    if cfg.get("policy_file"):
        return Path(cfg.policy_file)
    if cfg.get("policy_dir"):
        return Path(cfg.policy_dir) / POLICY_FILE
    raise EENNError("no policy: set policy_dir=<eenn-fit run dir> or policy_file=<policy.safetensors>.")


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
    if split not in ("val", "test"):
        raise EENNError(f"split must be 'val' or 'test', got {split!r}.")
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
    """Run the engine as ``cfg`` (conf/infer.yaml) says; write and return ``infer.json``'s content."""
    if cfg.mode not in MODES:
        raise EENNError(f"mode must be one of {MODES}, got {cfg.mode!r}.")
    if int(cfg.batch_size) < 1:
        raise EENNError(f"batch_size must be >= 1, got {cfg.batch_size}.")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    policy_file = resolve_policy_file(cfg)
    policy = ExitPolicy.load(policy_file)
    run_dir = resolve_run_dir(cfg)
    train_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    train_cfg.data = OmegaConf.merge(train_cfg.data, cfg.get("data") or {})
    dm = hydra.utils.instantiate(train_cfg.data, _convert_="all")
    dm.setup("test")
    network = load_network(train_cfg, dm, checkpoint_path(run_dir, str(cfg.checkpoint)))
    profile = CostProfile.from_dict(json.loads((run_dir / "costs.json").read_text()))
    preds = Predictions.load(run_dir / "predictions" / f"{cfg.split}.safetensors")
    x, y = load_split(dm, cfg.split)
    if preds.num_samples != len(y) or not torch.equal(preds.labels, y):
        raise EENNError(
            f"the {cfg.split} split ({len(y)} samples) does not match the run's saved predictions "
            f"({preds.num_samples}); were data overrides given that change the split?"
        )
    if policy.num_exits != preds.num_exits:
        raise EENNError(f"policy file {str(policy_file)!r} was fitted on {policy.num_exits} exits; run_dir's network has {preds.num_exits}.")

    engine = EarlyExitEngine(network, policy, device=cfg.device)
    bs = 1 if cfg.mode == "single" else int(cfg.batch_size)
    runner = Rebatcher(engine, bs).run if cfg.mode == "rebatch" else engine.run
    runner(batches_of(x[:bs], bs))  # warm-up: first calls allocate and pick kernels
    result = runner(batches_of(x, bs, y))
    backbone_s = time_backbone(engine.network, batches_of(x, bs)) if cfg.backbone_baseline else None

    expected_idx, expected_heads = simulate(policy, preds.logits, preds.labels)
    expected_pred = preds.logits[torch.arange(preds.num_samples), expected_idx].argmax(-1)
    unit = str(cfg.report_unit)
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

    ec = cfg.edge_cloud
    if ec.enabled:
        K = network.num_exits
        partition = measure_partition(
            engine.network, dm.input_shape, K - 2 if ec.split is None else int(ec.split),
            Link(float(ec.bandwidth_mbps), float(ec.rtt_ms)), float(ec.cloud_speedup),
            int(ec.latency_batch_size), int(ec.bytes_per_element), int(ec.repeats),
        )
        out["edge_cloud"] = edge_cloud_report(partition, result.exit_index, result.heads_evaluated, result.predictions, y)
        if policy.name == "deex" and ec.p_d_sweep:
            out["edge_cloud"]["p_d_curve"] = deex_time_curve(partition, preds, list(ec.p_d_sweep), policy.p_tar)

    write_json(Path(out_dir) / "infer.json", out)
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
