"""Does the exported bundle pay off against the model a deployer would otherwise ship?

On a trained stage-1 run (default: a CIFAR ResNet-56 with an exit after each group, trained here
on cifar10_small for 30 epochs, on the GPU when there is one; ``--run-dir`` takes a finished run
instead), maxprob and eenet are fitted at
``--fractions`` of the full cost and exported (``eenn-export``'s code path). For each policy,
budget and batch size (128, 1) this times on the CPU, interleaved, ``--repeats`` times over the
test split (``--single-samples`` of it at batch 1):

- ``plain``: the plain backbone exported whole (the bundle's ``backbone.onnx``) in ONNX Runtime;
- ``bundle``: the bundle with routing (:class:`eenn.deploy.Runtime`);
- ``eager``: eenn's engine in PyTorch on the same network and policy.

Reported per case (medians of the repeats): the bundle's realised speedup over ``plain``, the
speedup predicted from per-segment latency (each segment timed alone on full batches of that
size, the plain model beside it on the same batches: plain per-sample time / sum over k of the
share of samples reaching segment k times segment k's per-sample time), their ratio, the
router's share of the bundle's time (the runtime's handling of the decisions' outputs, plus, at
batch 1, what each exit's decision adds to the graph it is in: the segments against the same
stages and heads exported without the decisions, in request-like chains, mirrored; beside it the
method's null, the same measurement between two sessions of the decision-free graphs), the eager
engine's speedup over ``plain``, the exit fractions, and the acceptance checks: realised >= 0.9x
predicted at batch 128, router <= 1 % at batch 1, never slower than ``plain`` when >= 40 % of
samples exit at the first exit. ONNX Runtime and torch get the same number of threads.

    python benchmarks/deploy_speed.py                        # trains ResNet-56 on cifar10_small (--epochs 30)
    python benchmarks/deploy_speed.py --run-dir <stage-1 run dir>
    python benchmarks/deploy_speed.py --quick                # digits, one epoch, 2 repeats: a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")  # a benchmark: no wandb runs
os.environ.setdefault("WANDB_SILENT", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import add_output_args, compose_cfg, output_path, write_result  # noqa: E402

from eenn.deploy import Runtime  # noqa: E402
from eenn.inference.engine import EarlyExitEngine, batches_of  # noqa: E402
from eenn.rundir import ExportRun, FitRun, TrainRun  # noqa: E402
from eenn.tasks.build import datamodule, load_network  # noqa: E402
from eenn.tasks.export import export  # noqa: E402
from eenn.tasks.fit import fit_run  # noqa: E402
from eenn.tasks.infer import load_split  # noqa: E402
from eenn.tasks.train import train  # noqa: E402
from eenn.utils.overrides import override  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "deploy_speed.json"
CIFAR10_SMALL = Path(os.environ.get("EENN_SHARED", REPO.parent / "shared")) / "datasets" / "cifar10_small.npz"
POLICIES = ("maxprob", "eenet")
#: the acceptance of the deployment issue
MIN_RATIO, MAX_ROUTER_PCT, FIRST_EXIT_SHARE = 0.9, 1.0, 0.4


def train_run(work: Path, quick: bool, backbone: str, epochs: int) -> tuple[Path, list[str]]:
    data = (
        ["data=digits"]
        if quick or not CIFAR10_SMALL.is_file()
        else ["data=cifar10_small", override("data.path", CIFAR10_SMALL)]
    )
    device = ["trainer=gpu", "trainer.precision=32"] if torch.cuda.is_available() else []
    overrides = [
        *data,
        override("backbone", "resnet20" if quick else backbone),
        "exits=stages",
        "training=joint",
        "logger=csv",
        "cost.latency=false",
        *device,
        override("trainer.max_epochs", 1 if quick else epochs),
        "trainer.enable_progress_bar=false",
        "seed=0",
    ]
    run = work / "train"
    if not TrainRun(run).finished():
        train(compose_cfg("train", overrides, run))
    return run, overrides


def _segment_run(graph: Any, h: list[np.ndarray], state: list[np.ndarray]) -> tuple[list, list]:
    """One segment graph of a bundle (fed the state where it decides): its outputs split into the
    next activation and the new state."""
    outs = graph.run(h + state if graph.exit is not None else h)
    return outs[: graph.logits], [outs[j] for j in graph.state_out]


def segment_latency_ms(rt: Runtime, x: np.ndarray, bs: int, repeats: int) -> tuple[list[float], float]:
    """Each segment alone on full batches of ``bs`` (its inputs: the previous segment's outputs)
    and, before each batch's segments, the plain model on that batch: per-sample milliseconds,
    medians over ``repeats`` passes over ``x``. The prediction divides the one by the other, so
    both are timed side by side: a slow spell of the machine moves both."""
    per: list[list[float]] = [[] for _ in range(rt.num_exits)]
    plain: list[float] = []
    for _ in range(repeats):
        for a in range(0, len(x) - bs + 1, bs):
            t = time.perf_counter()
            rt.predict_backbone(x[a : a + bs])
            plain.append((time.perf_counter() - t) * 1e3 / bs)
            h, state = [x[a : a + bs]], []
            for k, seg in enumerate(rt.segments):
                t = time.perf_counter()
                h, state = _segment_run(seg, h, state)
                per[k].append((time.perf_counter() - t) * 1e3 / bs)
    return [statistics.median(p) for p in per], statistics.median(plain)


def decision_graph_us(rt: Runtime, network: Any, x: np.ndarray, work: Path) -> tuple[list[float], list[float]]:
    """What each exit's in-graph decision adds to a batch-1 run, exits 0..K-2, and the method's null.

    Three chains of graphs over exits 0..K-2 run each sample, one graph per exit as in a request:
    the bundle's segments, the same stages and heads exported without the decisions, and a second
    session of those. Each session keeps its own weights, so how recently it ran moves its time by
    tens of microseconds; every chain therefore runs twice per sample in mirrored order (ABCCBA,
    the order turning every sample). Per exit, the median over samples of the segment's time less
    the mean of the two decision-free sessions' is the decision's cost, and the second session
    less the first is the null: what the method reads when there is nothing to find. Both in
    microseconds."""
    from eenn.deploy.export import _export_graph, _Part  # the bundle's own export, less the decision

    K = rt.num_exits
    bare, twin = [], []
    with torch.inference_mode():
        h = torch.from_numpy(np.ascontiguousarray(x[:8]))  # as the bundle was traced: see export_bundle
        for k in range(K - 1):
            path = work / f"no_decision_{k}.onnx"
            if not path.is_file():
                _export_graph(
                    _Part(network.stages[k], network.heads[k], True),
                    (h,),
                    path,
                    rt.segments[k].inputs[:1],
                    ["h_out", "logits"],
                    int(rt.bundle.manifest["opset"]),
                )
            bare.append(rt._load(path))
            twin.append(rt._load(path))
            h = network.forward_stage(k, h)

    def chain(arm: int, sample: np.ndarray) -> np.ndarray:
        h, state, t = [sample], [], np.empty(K - 1)
        for k in range(K - 1):
            t0 = time.perf_counter()
            if arm == 0:
                h, state = _segment_run(rt.segments[k], h, state)
            else:
                h = (bare if arm == 1 else twin)[k].run(h)[:-1]
            t[k] = time.perf_counter() - t0
        return t

    orders = list(itertools.permutations(range(3)))
    diffs, nulls = [], []
    for i in range(len(x)):
        total = np.zeros((3, K - 1))
        order = orders[i % len(orders)]
        for arm in order + order[::-1]:
            total[arm] += chain(arm, x[i : i + 1])
        # against both decision-free sessions, whose difference is the null
        diffs.append(0.5e6 * (total[0] - 0.5 * (total[1] + total[2])))
        nulls.append(0.5e6 * (total[2] - total[1]))
    return np.median(diffs, 0).tolist(), np.median(nulls, 0).tolist()


def measure(
    rt: Runtime,
    engine: EarlyExitEngine,
    x: torch.Tensor,
    bs: int,
    repeats: int,
    decision: tuple[list[float], list[float]] | None,
) -> dict[str, Any]:
    xn = x.numpy()
    n = len(xn)
    rt.predict(xn[:bs], bs)  # warm-ups
    rt.predict_backbone(xn[:bs], bs)
    engine.run(batches_of(x[:bs], bs))
    times: dict[str, list[float]] = {"plain": [], "bundle": [], "eager": []}
    router: list[float] = []
    out = None

    def plain() -> None:
        t = time.perf_counter()
        rt.predict_backbone(xn, bs)
        times["plain"].append(time.perf_counter() - t)

    def bundle() -> None:
        nonlocal out
        t = time.perf_counter()
        out = rt.predict(xn, bs)
        times["bundle"].append(time.perf_counter() - t)
        router.append(out.decision_s)

    def eager() -> None:
        t = time.perf_counter()
        engine.run(batches_of(x, bs))
        times["eager"].append(time.perf_counter() - t)

    passes = [plain, bundle, eager]
    for r in range(repeats):  # interleaved, the order turning each repeat: drifting load hits all three
        for p in passes[r % 3 :] + passes[: r % 3]:
            p()
    med = {k: statistics.median(v) for k, v in times.items()}
    K = rt.num_exits
    fractions = np.bincount(out.exits, minlength=K) / n
    reach = 1.0 - np.concatenate([[0.0], np.cumsum(fractions)[:-1]])  # share of samples running segment k
    seg_ms, plain_beside_ms = segment_latency_ms(rt, xn, bs, max(1, repeats // 3))
    predicted_ms = float(np.dot(reach, seg_ms))
    realised = med["plain"] / med["bundle"]
    predicted = plain_beside_ms / predicted_ms
    decided = out.heads[:, : K - 1].mean(0)  # share of samples decided on at exit k (the last exit decides nothing)
    # the router: the runtime's handling of the decisions (timed in it), plus, at batch 1, what the
    # decisions add to the graphs they are in (per sample: each exit's cost times the share decided there)
    python_us = 1e6 * statistics.median(router) / n
    decision_us, null_us = decision if decision is not None else (None, None)
    graph_us = float(np.dot(decided, decision_us)) if decision_us is not None else None
    router_us = python_us + (graph_us or 0.0)
    return {
        "batch_size": bs,
        "num_samples": n,
        "exit_fractions": fractions.tolist(),
        "seconds": med,
        "seconds_passes": times,
        "ms_per_sample": {k: 1e3 * v / n for k, v in med.items()},
        "segment_ms_per_sample": seg_ms,
        "plain_ms_per_sample_beside_segments": plain_beside_ms,
        "predicted_ms_per_sample": predicted_ms,
        "realised_speedup": realised,
        "predicted_speedup": predicted,
        "realised_over_predicted": realised / predicted,
        "router_pct": 100 * router_us * n / (1e6 * med["bundle"]),
        "router_us_per_sample": router_us,
        "router_python_us_per_sample": python_us,
        "router_in_graph_us_per_sample": graph_us,
        "decision_in_graph_us_per_exit": decision_us,
        "decision_in_graph_null_us_per_exit": null_us,
        "decisions_per_sample": float(decided.sum()),
        "eager_speedup_over_plain_onnx": med["plain"] / med["eager"],
        "bundle_over_eager_speedup": med["eager"] / med["bundle"],
    }


def acceptance(row: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, Any] = {}
    if row["batch_size"] >= 128:
        checks["realised_at_least_0.9x_predicted"] = row["realised_over_predicted"] >= MIN_RATIO
    if row["batch_size"] == 1:
        checks["router_at_most_1pct"] = row["router_pct"] <= MAX_ROUTER_PCT
    if row["exit_fractions"][0] >= FIRST_EXIT_SHARE:
        checks["not_slower_than_plain_onnx"] = row["realised_speedup"] >= 1.0
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="a finished stage-1 run (default: train one)")
    parser.add_argument(
        "--work", type=Path, default=Path("outputs/bench_deploy"), help="where runs, fits and bundles go"
    )
    parser.add_argument("--backbone", default="resnet56", help="conf/backbone of the run it trains")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.8])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--single-samples", type=int, default=1000, help="test samples timed at batch 1")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime and torch threads (default: torch's)")
    add_output_args(parser)
    args = parser.parse_args()
    out_path = output_path(args, OUT)
    if args.quick:
        args.work = out_path.parent / "work"
        args.repeats, args.fractions, args.single_samples = 2, [0.8], 40
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.run_dir is None:
        run_dir, overrides = train_run(args.work, args.quick, args.backbone, args.epochs)
    else:
        run_dir = args.run_dir.resolve()
        overrides = TrainRun(run_dir).overrides() if TrainRun(run_dir).overrides_file.is_file() else None
    run = TrainRun(run_dir)
    dm = datamodule(run)
    dm.setup("test")
    x, y = load_split(dm, "test")
    network = load_network(run, "best", dm)
    result: dict[str, Any] = {
        "run_dir": str(run_dir),
        "train_overrides": overrides,
        "test_accuracy": run.metrics().get("test_accuracy"),
        "threads": threads,
        "host": platform.node(),
        "torch": torch.__version__,
        "repeats": args.repeats,
        "cases": [],
    }
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    for policy in POLICIES:
        for fraction in args.fractions:
            tag = f"{policy}_{fraction:g}"
            fit_dir, export_dir = args.work / f"fit_{tag}", args.work / f"export_{tag}"
            if not FitRun(fit_dir).finished():
                fit_run(
                    compose_cfg(
                        "fit",
                        [
                            override("run_dir", run_dir),
                            override("policy", policy),
                            override("budget.fraction", fraction),
                            "wandb.enabled=false",
                        ],
                        fit_dir,
                    ),
                    fit_dir,
                )
            if not ExportRun(export_dir).finished():
                export(compose_cfg("export", [override("policy_dir", fit_dir)], export_dir), export_dir)
            rt = Runtime(export_dir, threads=threads)
            engine = EarlyExitEngine(network, FitRun(fit_dir).policy())
            for bs in args.batch_sizes:
                xs = x if bs > 1 else x[: args.single_samples]
                decision = decision_graph_us(rt, network, xs.numpy(), export_dir) if bs == 1 else None
                row = {
                    "policy": policy,
                    "budget_fraction": fraction,
                    **measure(rt, engine, xs, bs, args.repeats, decision),
                }
                row["acceptance"] = acceptance(row)
                result["cases"].append(row)
                print(
                    f"{tag:14s} batch {bs:3d}: exits {np.round(row['exit_fractions'], 3).tolist()}  realised "
                    f"{row['realised_speedup']:.3f}x  predicted {row['predicted_speedup']:.3f}x  ratio "
                    f"{row['realised_over_predicted']:.3f}  router {row['router_pct']:.2f}% "
                    f"({row['router_us_per_sample']:.1f} us/sample)  eager "
                    f"{row['eager_speedup_over_plain_onnx']:.3f}x  {row['acceptance']}",
                    flush=True,
                )
    result["acceptance"] = {
        name: all(c["acceptance"][name] for c in result["cases"] if name in c["acceptance"])
        for name in ("realised_at_least_0.9x_predicted", "router_at_most_1pct", "not_slower_than_plain_onnx")
    }
    write_result(out_path, result)
    print(result["acceptance"], f"-> {out_path}")


if __name__ == "__main__":
    main()
