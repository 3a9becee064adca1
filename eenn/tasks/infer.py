"""The eenn-infer job: a stage-1 run's network and a fitted policy, run for real.

Loads the run (config, checkpoint, cost profile, saved predictions), runs the engine over a split
(batched, rebatched or one sample per request), times the plain backbone on the same inputs,
and writes the result (:class:`eenn.rundir.InferRun`): accuracy, the Distiller-style cost table
expected (offline simulation on the saved predictions) and realised (the exits the engine took),
their agreement, wall-time speedup (medians over ``timing_repeats`` interleaved passes),
per-request latency, and the edge/cloud partition simulation (with the time curve over p_d for a
policy that has one, DEEx's).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from eenn.errors import EENNError, check_flag, check_number, is_number
from eenn.inference.edge_cloud import Link, edge_cloud_report, measure_partition, p_d_time_curve
from eenn.inference.engine import EarlyExitEngine, ExitResult, batches_of, time_backbone
from eenn.inference.rebatch import Rebatcher
from eenn.inference.report import UNITS, expected_vs_realised, format_report, timing_summary
from eenn.policies.base import ExitPolicy
from eenn.predictions import SPLITS
from eenn.rundir import FitRun, InferRun, TrainRun
from eenn.tasks.build import datamodule, load_network

MODES = ("batched", "rebatch", "single")
#: torch: eenn's engine on the run's network; onnxruntime: an eenn-export bundle (eenn.deploy)
RUNTIMES = ("torch", "onnxruntime")


def resolve_policy_file(cfg: DictConfig, default: str | None = None) -> Path:
    """``policy_file``, else ``policy_dir``'s policy, else ``default`` (a bundle's source policy)."""
    if not cfg.get("policy_file") and not cfg.get("policy_dir") and default:
        if not Path(default).is_file():
            raise EENNError(
                f"the bundle's source policy file {default!r} does not exist here; set policy_dir or "
                "policy_file to the policy it was exported with."
            )
        return Path(default)
    if cfg.get("policy_file"):
        path = Path(cfg.policy_file)
        if not path.is_file():
            raise EENNError(f"policy_file={str(path)!r} does not exist.")
        return path
    if cfg.get("policy_dir"):
        fit = FitRun(cfg.policy_dir)
        fit.settle()
        fit.check_app("policy_dir")
        if not fit.policy_file.is_file():
            raise EENNError(
                f"policy_dir={str(cfg.policy_dir)!r} holds no {fit.policy_file.name}: it is not an eenn-fit run dir."
            )
        return fit.policy_file
    raise EENNError("no policy: set policy_dir=<eenn-fit run dir> or policy_file=<policy file>.")


def check_config(cfg: DictConfig) -> None:
    """Refuse bad settings before loading anything, each with one sentence naming its key."""
    if cfg.mode not in MODES:
        raise EENNError(f"mode must be one of {MODES}, got {cfg.mode!r}.")
    runtime = cfg.get("runtime", "torch")
    if runtime not in RUNTIMES:
        raise EENNError(f"runtime must be one of {RUNTIMES}, got {runtime!r}.")
    if runtime == "onnxruntime":
        if not cfg.get("bundle"):
            raise EENNError("runtime=onnxruntime needs bundle=<an eenn-export run dir or its bundle/>.")
        if cfg.mode == "rebatch":
            raise EENNError("mode=rebatch is the torch engine's; runtime=onnxruntime runs mode=batched or mode=single.")
        if str(cfg.device) != "cpu":
            raise EENNError(f"device={cfg.device!r}: runtime=onnxruntime runs on the CPU here (device=cpu).")
        if check_flag(cfg.get("compile", False), "compile"):
            raise EENNError(
                "compile=true compiles the torch engine's segments; runtime=onnxruntime runs the bundle's "
                "own graphs (set compile=false)."
            )
    elif cfg.get("bundle"):
        raise EENNError("bundle= is read by runtime=onnxruntime only; add runtime=onnxruntime.")
    check_flag(cfg.get("force", False), "force")
    check_flag(cfg.backbone_baseline, "backbone_baseline")
    check_flag(cfg.get("compile", False), "compile")
    check_number(cfg.batch_size, "batch_size", 1, integer=True)
    check_number(cfg.timing_repeats, "timing_repeats", 1, integer=True)
    if cfg.get("threads") is not None:
        check_number(cfg.threads, "threads", 1, integer=True)
    if cfg.split not in SPLITS:
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
    if not check_flag(ec.enabled, "edge_cloud.enabled"):
        return
    if ec.split is not None:
        check_number(ec.split, "edge_cloud.split", -1, integer=True)
    check_number(ec.bandwidth_mbps, "edge_cloud.bandwidth_mbps", 0, strict=True)
    check_number(ec.rtt_ms, "edge_cloud.rtt_ms", 0)
    check_number(ec.cloud_speedup, "edge_cloud.cloud_speedup", 0, strict=True)
    check_number(ec.bytes_per_element, "edge_cloud.bytes_per_element", 1, integer=True)
    check_number(ec.latency_batch_size, "edge_cloud.latency_batch_size", 1, integer=True)
    check_number(ec.repeats, "edge_cloud.repeats", 1, integer=True)
    for p_d in ec.p_d_sweep or []:
        if not is_number(p_d) or not 0.0 <= p_d <= 1.0:
            raise EENNError(f"edge_cloud.p_d_sweep entries must be probabilities in [0, 1], got {p_d!r}.")


def resolve_run(cfg: DictConfig, default: str | None = None) -> TrainRun:
    """``run_dir``, or else the stage-1 run the policy dir was fitted on, or else ``default`` (a
    bundle's source run)."""
    if cfg.get("run_dir") or (default and not cfg.get("policy_dir")):
        run = TrainRun(cfg.get("run_dir") or default)
    else:
        run = FitRun(cfg.policy_dir).source_run() if cfg.get("policy_dir") else None
        if run is None:
            raise EENNError(
                "no run_dir: set run_dir=<stage-1 run dir> (the policy dir does not name the run it was fitted on)."
            )
    run.settle()
    run.check_app("run_dir")
    if not run.has_config():
        raise EENNError(f"run_dir={str(run.path)!r} is not a stage-1 run dir (it holds no saved config).")
    return run


def check_bundle_source(bundle: Any, source: dict[str, Any], run: TrainRun) -> None:
    """The run whose data and saved predictions the bundle is measured against must be the one it
    was exported from: its checkpoint of that name has the sha256 the manifest records (a bundle
    made before the sha256 was recorded: the run's dir is its source run_dir)."""
    from eenn.deploy.bundle import sha256

    if "checkpoint_sha256" in source:
        ckpt = run.checkpoint_dir / Path(str(source.get("checkpoint"))).name
        same = ckpt.is_file() and sha256(ckpt) == source["checkpoint_sha256"]
    else:
        same = Path(str(source.get("run_dir"))).resolve() == run.path.resolve()
    if not same:
        raise EENNError(
            f"run_dir={str(run.path)!r} is not the run bundle {str(bundle.path)!r} was exported from "
            f"({source.get('run_dir')!r}, by its checkpoint's sha256): give that run, or leave run_dir out."
        )


def load_split(dm: Any, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split in memory, so that timing measures the network, not the data pipeline."""
    xs, ys = zip(*dm.split_loader(split))
    return torch.cat(xs), torch.cat(ys)


def infer(cfg: DictConfig, out_dir: str | Path) -> dict[str, Any]:
    """Run the engine as ``cfg`` (conf/infer.yaml) says; write the result into ``out_dir`` and return it.
    ``threads`` holds for this call only: the jobs of a multirun share one process."""
    check_config(cfg)
    out = InferRun(out_dir)
    threads = torch.get_num_threads()
    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))
    try:
        with out.claimed(force=cfg.get("force", False)):
            return _infer(cfg, out)
    finally:
        torch.set_num_threads(threads)


def _infer(cfg: DictConfig, out_run: InferRun) -> dict[str, Any]:
    bundle = None
    if cfg.get("runtime", "torch") == "onnxruntime":
        from eenn.deploy.bundle import Bundle, sha256  # onnxruntime: only for this runtime

        bundle = Bundle(cfg.bundle)
    source = bundle.manifest["source"] if bundle is not None else {}
    policy_file = resolve_policy_file(cfg, source.get("policy_file"))
    policy = ExitPolicy.load(policy_file)
    run = resolve_run(cfg, source.get("run_dir"))
    dm = datamodule(run, cfg.get("data"))
    dm.setup("test")
    if bundle is not None:
        check_bundle_source(bundle, source, run)
    if bundle is not None and source.get("policy_sha256") not in (None, sha256(policy_file)):
        raise EENNError(
            f"policy file {str(policy_file)!r} is not the one bundle {str(bundle.path)!r} was exported with "
            "(its sha256 differs from the manifest's source.policy_sha256): give that policy."
        )
    network = load_network(run, str(cfg.checkpoint), dm) if bundle is None else None
    profile = run.costs()
    unit = str(cfg.report_unit)
    if profile.backbone.get(unit) is None:
        raise EENNError(
            f"report_unit={unit!r}: the run's cost profile has none (latency is measured only when "
            f"training ran with cost.latency=true); use report_unit=macs or flops."
        )
    preds = run.predictions(cfg.split)
    x, y = load_split(dm, cfg.split)
    if preds.num_samples != len(y) or not torch.equal(preds.labels, y):
        raise EENNError(
            f"the {cfg.split} split ({len(y)} samples) does not match the run's saved predictions "
            f"({preds.num_samples}); were data overrides given that change the split?"
        )
    if (policy.num_exits, policy.num_classes) != (preds.num_exits, preds.num_classes):
        raise EENNError(
            f"policy file {str(policy_file)!r} was fitted on {policy.num_exits} exits and {policy.num_classes} "
            f"classes; run_dir's network has {preds.num_exits} and {preds.num_classes}."
        )

    bs = 1 if cfg.mode == "single" else int(cfg.batch_size)
    if bundle is not None:
        if (bundle.num_exits, bundle.num_classes) != (
            preds.num_exits,
            preds.num_classes,
        ) or bundle.input_shape != tuple(x.shape[1:]):
            raise EENNError(
                f"bundle {str(bundle.path)!r} takes input {list(bundle.input_shape)} with {bundle.num_exits} "
                f"exits and {bundle.num_classes} classes; run_dir's data and network have "
                f"{list(x.shape[1:])}, {preds.num_exits} and {preds.num_classes}."
            )
        return _infer_bundle(cfg, out_run, bundle, policy, policy_file, run, preds, profile, x, y, bs)

    ec = cfg.edge_cloud
    split = network.num_exits - 2 if ec.split is None else int(ec.split)
    if ec.enabled and not -1 <= split < network.num_exits:
        raise EENNError(
            f"edge_cloud.split={split} must lie in -1..{network.num_exits - 1} (the stage after which to cut)."
        )

    engine = EarlyExitEngine(
        network, policy, device=cfg.device, compile=check_flag(cfg.get("compile", False), "compile")
    )
    runner = Rebatcher(engine, bs).run if cfg.mode == "rebatch" else engine.run
    runner(batches_of(x[:bs], bs))  # warm-up: first calls allocate and pick kernels
    results: list[ExitResult] = []
    backbone_s: list[float] = []
    passes = [lambda: results.append(runner(batches_of(x, bs, y)))]
    if cfg.backbone_baseline:
        time_backbone(engine.network, batches_of(x[:bs], bs), engine.backbone)  # its warm-up
        passes.append(lambda: backbone_s.append(time_backbone(engine.network, batches_of(x, bs), engine.backbone)))
    interleaved(passes, int(cfg.timing_repeats))
    result = results[0]  # every pass takes the same exits; only the times differ
    out = record(
        cfg,
        run,
        policy_file,
        policy,
        preds,
        profile,
        results,
        backbone_s,
        bs,
        {
            "runtime": "torch",
            "device": str(engine.device),
            "threads": torch.get_num_threads(),
            "compiled": bool(cfg.get("compile", False)),
        },
    )
    if ec.enabled:
        partition = measure_partition(
            engine.network,
            dm.input_shape,
            split,
            Link(float(ec.bandwidth_mbps), float(ec.rtt_ms)),
            float(ec.cloud_speedup),
            int(ec.latency_batch_size),
            int(ec.bytes_per_element),
            int(ec.repeats),
        )
        out["edge_cloud"] = edge_cloud_report(
            partition, result.exit_index, result.heads_evaluated, result.predictions, y
        )
        if policy.has_p_d_curve and ec.p_d_sweep:
            out["edge_cloud"]["p_d_curve"] = p_d_time_curve(partition, preds, list(ec.p_d_sweep), policy)

    return finish(cfg, out_run, out)


def interleaved(passes: list[Callable[[], None]], repeats: int) -> None:
    """Run every pass ``repeats`` times, interleaved, the order flipping each repeat, as
    benchmarks/inference_speed.py times: load that drifts during the run hits them alike."""
    for r in range(repeats):
        for run_pass in passes if r % 2 == 0 else passes[::-1]:
            run_pass()


def record(
    cfg: DictConfig,
    run: TrainRun,
    policy_file: Path,
    policy: ExitPolicy,
    preds: Any,
    profile: Any,
    results: list[ExitResult],
    backbone_s: list[float],
    bs: int,
    where: dict[str, Any],
) -> dict[str, Any]:
    """What an inference run records: the run, the policy, ``where`` it ran (runtime, device, threads...),
    expected next to realised, and the timing (every pass takes the same exits; only times differ)."""
    result = results[0]
    return {
        **where,
        "run_dir": str(run.path),
        "policy_file": str(policy_file),
        "policy": {"name": policy.name, "cost_unit": policy.cost_unit, "budget": policy.budget, "info": policy.info},
        "split": cfg.split,
        "num_samples": result.num_samples,
        "mode": cfg.mode,
        "batch_size": bs,
        "host": platform.node(),
        **expected_vs_realised(policy, preds, result, profile, str(cfg.report_unit)),
        "timing": timing_summary(results, backbone_s or None),
        "edge_cloud": None,
    }


def finish(cfg: DictConfig, out_run: InferRun, out: dict[str, Any]) -> dict[str, Any]:
    out_run.write_config(cfg)
    out_run.write_result(out)
    print(summary_text(out))
    return out


def _infer_bundle(
    cfg: DictConfig,
    out_run: InferRun,
    bundle: Any,
    policy: ExitPolicy,
    policy_file: Path,
    run: TrainRun,
    preds: Any,
    profile: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    bs: int,
) -> dict[str, Any]:
    """runtime=onnxruntime: the bundle in ONNX Runtime, next to offline simulation of the policy it
    was exported with, timed against the plain network in ONNX Runtime (its backbone.onnx)."""
    from eenn.deploy import Runtime
    from eenn.deploy.bundle import BACKBONE

    rt = Runtime(bundle, threads=cfg.get("threads"))
    xn = x.numpy()
    rt.predict(xn[:bs], bs)  # warm-up
    results: list[ExitResult] = []
    backbone_s: list[float] = []

    def bundle_pass() -> None:
        p = rt.predict(xn, bs)
        results.append(
            ExitResult(
                predictions=torch.from_numpy(p.classes),
                exit_index=torch.from_numpy(p.exits),
                heads_evaluated=torch.from_numpy(p.heads),
                logits=torch.from_numpy(p.logits),
                latency_ms=torch.from_numpy(p.latency_ms),
                wall_s=p.wall_s,
                policy_s=p.decision_s,
                labels=y,
                stage_batch_sizes=p.stage_batch_sizes,
            )
        )

    def backbone_pass() -> None:
        t = time.perf_counter()
        rt.predict_backbone(xn, bs)
        backbone_s.append(time.perf_counter() - t)

    passes = [bundle_pass]
    if cfg.backbone_baseline and BACKBONE in bundle.manifest["files"]:
        rt.predict_backbone(xn[:bs], bs)  # its warm-up
        passes.append(backbone_pass)
    interleaved(passes, int(cfg.timing_repeats))
    # no edge/cloud partition: it is measured on the torch network (runtime=torch)
    where = {
        "runtime": "onnxruntime",
        "bundle": str(bundle.path),
        "device": "cpu (onnxruntime)",
        "threads": rt.options.intra_op_num_threads or "onnxruntime's default",
    }
    return finish(cfg, out_run, record(cfg, run, policy_file, policy, preds, profile, results, backbone_s, bs, where))


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_text(out: dict[str, Any]) -> str:
    """The cost table, expected vs realised, with accuracy, wall time and edge/cloud lines."""
    t = out["timing"]
    # how the times were taken, in the labels: one pass is noisy, the median of interleaved passes less so
    passes = "one pass" if t["repeats"] == 1 else f"median of {t['repeats']} interleaved passes"
    extra = [
        ("Accuracy", [fmt(out["accuracy"]["expected"], ".4f"), fmt(out["accuracy"]["realised"], ".4f")]),
        ("Same exit as offline simulation", ["", f"{100 * out['agreement']['exit_index']:.2f}%"]),
        (
            f"Wall time engine / plain backbone (s, {passes})",
            ["", f"{t['engine_s']:.3f} / {fmt(t['backbone_s'], '.3f')}"],
        ),
        (f"Measured wall-time speedup ({passes})", ["", fmt(t["realised_speedup"], ".3f")]),
        ("Policy overhead (% of backbone time)", ["", fmt(t["policy_overhead_pct"], ".3f")]),
    ]
    ec = out["edge_cloud"]
    if ec is not None:
        extra += [
            (
                f"Edge/cloud: split after stage {ec['partition']['split']}, mean ms/sample",
                ["", f"{ec['time_ms']['mean']:.3f}"],
            ),
            (
                "Edge/cloud: offload ratio, MB sent",
                ["", f"{100 * ec['offload_ratio']:.2f}%, {ec['bytes_sent'] / 1e6:.3f}"],
            ),
        ]
    head = (
        f"{out['policy']['name']} on {out['split']} ({out['num_samples']} samples), mode {out['mode']}, "
        f"batch {out['batch_size']}, {out['device']} x{out['threads']} threads"
    )
    return head + "\n" + format_report(out["cost_report"], extra)
