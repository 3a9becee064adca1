"""The eenn-export job: a stage-1 run's network and a fitted policy, written as a deployment bundle
(:mod:`eenn.deploy.export`) into ``bundle/`` of the job's run dir (:class:`eenn.rundir.ExportRun`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from eenn.errors import EENNError, check_flag, check_number
from eenn.policies.base import ExitPolicy
from eenn.predictions import SPLITS
from eenn.rundir import ExportRun
from eenn.tasks.build import datamodule, load_network
from eenn.tasks.infer import resolve_policy_file, resolve_run

FORMATS = ("onnx",)
#: what exporting needs beside eenn's own dependencies (the ``deploy`` extra)
NEEDS = ("onnx", "onnxscript", "onnxruntime")


def check_config(cfg: DictConfig) -> None:
    """Refuse bad settings before loading anything, each with one sentence naming its key."""
    if cfg.format not in FORMATS:
        raise EENNError(f"format must be one of {FORMATS}, got {cfg.format!r}.")
    check_number(cfg.opset, "opset", 18, integer=True)
    check_number(cfg.check.batch_size, "check.batch_size", 1, integer=True)
    check_number(cfg.check.atol, "check.atol", 0)
    check_number(cfg.check.rtol, "check.rtol", 0)
    if cfg.check.split not in SPLITS:
        raise EENNError(f"check.split must be 'val' or 'test', got {cfg.check.split!r}.")
    check_flag(cfg.baseline, "baseline")
    check_flag(cfg.get("force", False), "force")
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        raise EENNError(
            f"eenn-export needs {', '.join(missing)}: pip install 'eenn[deploy]' (or pip install {' '.join(missing)})."
        )
    import onnx.defs  # only now that it is known to be there

    newest = onnx.defs.onnx_opset_version()
    if cfg.opset > newest:  # the exporter would fall back to opset 18 graphs behind a manifest saying otherwise
        raise EENNError(f"opset must be at most {newest}, the newest the installed onnx knows, got {cfg.opset}.")


def export(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Export as ``cfg`` (conf/export.yaml) says into ``out_dir``; return the bundle's manifest."""
    check_config(cfg)
    out = ExportRun(out_dir)
    with out.claimed(force=cfg.get("force", False)):
        return _export(cfg, out)


def _export(cfg: DictConfig, out: ExportRun) -> dict[str, Any]:
    from eenn.deploy.bundle import sha256
    from eenn.deploy.export import check_exportable, export_bundle  # onnx: only when a job exports

    policy_file = resolve_policy_file(cfg)
    policy = ExitPolicy.load(policy_file)
    run = resolve_run(cfg)
    dm = datamodule(run, cfg.get("data"))
    dm.setup("test")
    network = load_network(run, str(cfg.checkpoint), dm)
    check_exportable(policy, network)
    if policy.num_classes != dm.num_classes:
        raise EENNError(
            f"policy file {str(policy_file)!r} was fitted on {policy.num_classes} classes; run_dir's "
            f"network has {dm.num_classes}."
        )
    need = int(cfg.check.batch_size)
    xs, n = [], 0
    for x, _ in dm.split_loader(str(cfg.check.split)):
        xs.append(x)
        n += x.shape[0]
        if n >= need:
            break
    batch = torch.cat(xs)[:need]
    checkpoint = run.checkpoint(str(cfg.checkpoint))
    # the run is known by its checkpoint's bytes too: eenn-infer checks a run_dir given with the bundle
    source = {
        "run_dir": str(run.path),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256(checkpoint),
        "policy_file": str(Path(policy_file).resolve()),
        "policy_sha256": sha256(Path(policy_file)),
    }
    bundle = export_bundle(
        network,
        policy,
        run.costs(),
        batch,
        out.bundle_dir,
        class_names=dm.class_names,
        normalisation=getattr(dm, "normalisation", None),
        source=source,
        opset=int(cfg.opset),
        backbone=cfg.baseline,
        atol=float(cfg.check.atol),
        rtol=float(cfg.check.rtol),
        replace=cfg.get("force", False),
    )
    out.write_config(cfg)
    m = bundle.manifest
    sizes = {name: (bundle.path / name).stat().st_size for name in m["files"]}
    print(
        f"bundle: {bundle.path}  ({len(sizes)} files, {sum(sizes.values()) / 1e6:.2f} MB; policy {policy.name}, "
        f"{bundle.num_exits} exits, opset {m['opset']})"
    )
    worst = max((e for errs in m["check"]["max_abs_error"].values() for e in errs.values()), default=0.0)
    print(
        f"checked in ONNX Runtime against PyTorch on {m['check']['batch_size']} {cfg.check.split} samples: "
        f"largest difference {worst:.2g} (atol {m['check']['atol']:g}, rtol {m['check']['rtol']:g})"
    )
    return m
