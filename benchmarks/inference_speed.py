"""Does real early exit pay what the cost model predicts?

For each backbone (CIFAR ResNet-56 with an exit after each group; timm resnet18 at 64x64 with
exits after layer1 and layer2; DeiT-tiny at 32x32 with 4-px patches, as in
experiment=vit_cifar10_small, with token exits after blocks 4 and 8), batch size (128, 1) and exit mix (40/30/30,
60/20/20 of the
samples at exits 0/1/2, exact over the stream), this times on the CPU, interleaved and over
``--repeats`` repeats:

- the plain backbone (``forward_backbone``, no exit heads) over the stream,
- a profiling pass timing every stage and head over the same stream (per-sample latencies at
  that batch size: what the latency prediction uses),
- the engine, and at batch 128 the rebatching engine (at batch 1 they are the same).

The policy exits a pre-drawn subset of samples at each exit (so the mix is exact) after computing
the max-softmax score, as a confidence policy would. With ``--compile``, also the engine and the
plain backbone with every segment through ``torch.compile`` (dynamic batch size): rows of mode
``engine_compiled`` with their realised speedup (compiled plain / compiled engine) and each one's
speedup over its eager self. Written to
``benchmarks/results/inference_speed.json``: per run, predicted speedups (full cost / expected
cost, in FLOPs and in per-stage latency), the realised one (plain time / engine time, medians),
their ratios and the policy's decision time as % of the plain backbone's.

    python benchmarks/inference_speed.py                        # full: 15 repeats, this machine's threads
    python benchmarks/inference_speed.py --quick                # one batch, 2 repeats: a smoke run (JSON to /tmp)
    python benchmarks/inference_speed.py --threads 1 --batch-sizes 128 --backbones cifar_resnet56 --update
                                                                # one slice, merged into the existing JSON
    python benchmarks/inference_speed.py --threads 1 --backbones cifar_resnet56 --compile --update
                                                                # + the compiled rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import add_output_args, output_path, write_result

from eenn.cost import profile_costs
from eenn.inference.engine import EarlyExitEngine, batches_of, time_backbone
from eenn.inference.rebatch import Rebatcher
from eenn.models import build_multi_exit
from eenn.models.multi_exit import MultiExitNetwork
from eenn.policies.base import Decision, ExitPolicy, State, continue_to_next
from eenn.policies.features import max_prob
from eenn.utils.syncs import SyncCounter

OUT = Path(__file__).resolve().parent / "results" / "inference_speed.json"
BACKBONES: dict[str, dict[str, Any]] = {
    "cifar_resnet56": {
        "backbone": {"name": "cifar_resnet", "depth": 56},
        "exits": {"at": "stages", "head": {"name": "conv_pool"}},
        "shape": (3, 32, 32),
    },
    "timm_resnet18_64px": {
        "backbone": {"name": "timm", "model": "resnet18"},
        "exits": {"at": ["layer1", "layer2"], "head": {"name": "conv_pool"}},
        "shape": (3, 64, 64),
    },
    "deit_tiny_32px": {
        "backbone": {"name": "deit_tiny_patch16_224", "img_size": 32, "patch_size": 4},
        "exits": {"at": [4, 8], "head": {"name": "token"}},
        "shape": (3, 32, 32),
    },
    # compute-bound on a GPU, where early exit should pay (gpu_check.py); hours on one CPU thread
    "timm_resnet50_224px": {
        "backbone": {"name": "timm", "model": "resnet50"},
        "exits": {"at": ["layer2", "layer3"], "head": {"name": "conv_pool"}},
        "shape": (3, 224, 224),
    },
}
CPU_BACKBONES = ["cifar_resnet56", "timm_resnet18_64px", "deit_tiny_32px"]
MIXES = {"40/30/30": (0.4, 0.3, 0.3), "60/20/20": (0.6, 0.2, 0.2)}


class FixedMixPolicy(ExitPolicy):
    """Exits a pre-drawn plan: sample i of the stream answers at exit ``plan[i]``. Benchmark only.

    It decides op for op as a confidence policy does (``maxprob``: ``max_prob(logits) >= t_k``,
    with exit k's threshold held ready), with per-sample thresholds that carry the plan: 0 at the
    planned exit (a max-softmax score is > 0) and 2 elsewhere (it is <= 1). They travel in the
    state as one column per exit, so reading exit k's costs no tensor op."""

    name = "fixed_mix"

    def __init__(self, plan: torch.Tensor, num_classes: int) -> None:
        super().__init__()
        self.cursor, self.num_exits, self.num_classes = 0, int(plan.max()) + 1, num_classes
        thresholds = torch.full((self.num_exits, plan.numel()), 2.0).scatter_(0, plan[None], 0.0)
        self.keys, self.columns = tuple(f"t{k}" for k in range(self.num_exits)), thresholds.unbind()

    def reset(self) -> None:
        self.cursor = 0

    def to(self, device: str | torch.device) -> FixedMixPolicy:
        self.device = torch.device(device)
        self.columns = tuple(c.to(self.device) for c in self.columns)
        return self

    def init_state(self, n: int) -> State:
        c, self.cursor = self.cursor, self.cursor + n
        return {key: column[c : c + n] for key, column in zip(self.keys, self.columns)}

    def _decide(self, k: int, logits_k: torch.Tensor, state: State) -> Decision:
        return continue_to_next(k, max_prob(logits_k) >= state[self.keys[k]], state)


def draw_plan(n: int, fractions: tuple[float, ...], seed: int) -> torch.Tensor:
    counts = [round(f * n) for f in fractions]
    if sum(counts) != n or any(abs(c - f * n) > 1e-9 for c, f in zip(counts, fractions)):
        raise ValueError(f"{n} samples cannot be split exactly as {fractions}")
    plan = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    return plan[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


@torch.inference_mode()
def profile_pass(net: MultiExitNetwork, batches: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Seconds spent in each stage and each head over the stream, every sample through everything."""
    K = net.num_exits
    stage, head = [0.0] * K, [0.0] * K
    sync = torch.cuda.synchronize if batches[0].is_cuda else (lambda: None)
    for x in batches:
        for k in range(K):
            sync()
            t0 = time.perf_counter()
            x = net.forward_stage(k, x)
            sync()
            t1 = time.perf_counter()
            net.forward_exit(k, x)
            sync()
            stage[k] += t1 - t0
            head[k] += time.perf_counter() - t1
    return stage, head


def bench_backbone(
    name: str,
    spec: dict[str, Any],
    batch_size: int,
    n: int,
    repeats: int,
    seed: int,
    compile: bool = False,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    net = build_multi_exit(spec["backbone"], spec["exits"], num_classes=10, input_shape=spec["shape"]).eval()
    flops = profile_costs(net, spec["shape"], latency=False)
    net = net.to(device)
    x = torch.randn(n, *spec["shape"]).to(device)  # on the device before timing, as a server's batches would be
    batches = list(batches_of(x, batch_size))
    modes = ["engine", "rebatch"] if batch_size > 1 else ["engine"]  # at batch 1 rebatching is the engine
    if compile:
        modes.append("engine_compiled")

    policies = {mix: FixedMixPolicy(draw_plan(n, f, seed), 10) for mix, f in MIXES.items()}
    runners: dict[str, Callable[[], Any]] = {
        "plain": lambda: time_backbone(net, batches),
        "profile": lambda: profile_pass(net, batches),
    }
    engines: dict[str, EarlyExitEngine] = {}
    for mix, policy in policies.items():  # an engine on a GPU decides with its own copy of the policy: reset that one
        engines[mix] = engine = EarlyExitEngine(net, policy)
        runners[f"engine {mix}"] = lambda e=engine: (e.policy.reset(), e.run(batches))[1]
        if "rebatch" in modes:
            rebatcher = Rebatcher(engine, batch_size)
            runners[f"rebatch {mix}"] = lambda e=engine, r=rebatcher: (e.policy.reset(), r.run(batches))[1]
        if compile:
            compiled = EarlyExitEngine(net, policy, compile=True)
            runners[f"engine_compiled {mix}"] = lambda e=compiled: (e.policy.reset(), e.run(batches))[1]
            runners.setdefault("plain_compiled", lambda e=compiled: time_backbone(net, batches, e.backbone))

    samples: dict[str, list[Any]] = {key: [] for key in runners}
    for fn in runners.values():  # warm-up: allocator, kernel choice, oneDNN primitives per batch shape, compiling
        fn()
    order = list(runners)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)  # interleaved, in a fresh order each repeat: drifting load hits all alike
        for key in order:
            t0 = time.perf_counter()
            out = runners[key]()
            samples[key].append((time.perf_counter() - t0, out))

    plain_s = statistics.median(t for t, _ in samples["plain"])
    plain_compiled_s = statistics.median(t for t, _ in samples["plain_compiled"]) if compile else None
    K = net.num_exits
    stage_s = [statistics.median(out[0][k] for _, out in samples["profile"]) for k in range(K)]
    head_s = [statistics.median(out[1][k] for _, out in samples["profile"]) for k in range(K)]
    cum_lat, acc = [], 0.0
    for k in range(K):
        acc += stage_s[k] + head_s[k]
        cum_lat.append(acc)
    full_lat = sum(stage_s) + head_s[-1]
    cum_flops = flops.per_exit("flops")

    rows = []
    for mix, fractions in MIXES.items():
        for mode in modes:
            runs = samples[f"{mode} {mix}"]
            run_s = statistics.median(t for t, _ in runs)
            policy_s = statistics.median(r.policy_s for _, r in runs)
            flops_pred = flops.backbone["flops"] / sum(f * c for f, c in zip(fractions, cum_flops))
            # the latency prediction comes from the eager profile, for the compiled rows too
            lat_pred = full_lat / sum(f * c for f, c in zip(fractions, cum_lat))
            base_s = plain_compiled_s if mode == "engine_compiled" else plain_s
            realised = base_s / run_s
            last = runs[-1][1]
            rows.append(
                {
                    "backbone": name,
                    "mode": mode,
                    "batch_size": batch_size,
                    "exit_mix": mix,
                    "flops_predicted_speedup": flops_pred,
                    "latency_predicted_speedup": lat_pred,
                    "realised_speedup": realised,
                    "latency_ratio": realised / lat_pred,
                    "flops_ratio": realised / flops_pred,
                    "policy_overhead_pct": 100 * policy_s / base_s,
                    # context
                    "realised_exit_fractions": last.exit_fractions(),
                    "n_samples": n,
                    "repeats": repeats,
                    "plain_ms_per_sample": 1e3 * plain_s / n,
                    "run_ms_per_sample": 1e3 * run_s / n,
                    "stage_ms_per_sample": [1e3 * t / n for t in stage_s],
                    "head_ms_per_sample": [1e3 * t / n for t in head_s],
                    "flops_fraction_per_stage": _stage_fractions(flops),
                    "mean_stage_batch": [sum(b) / len(b) if b else None for b in last.stage_batch_sizes],
                    "plain_s_spread": [min(t for t, _ in samples["plain"]), max(t for t, _ in samples["plain"])],
                    "run_s_spread": [min(t for t, _ in runs), max(t for t, _ in runs)],
                }
            )
            if mode == "engine" and x.is_cuda:  # the engine's host-device syncs, from PyTorch's sync debug mode
                engine = engines[mix]
                engine.policy.reset()
                with SyncCounter(cuda=True) as syncs:
                    engine.run(batches)
                rows[-1]["syncs_per_batch"] = syncs.total / len(batches)
            if mode == "engine_compiled":
                eager_s = statistics.median(t for t, _ in samples[f"engine {mix}"])
                rows[-1].update(
                    {
                        "speedup_over_eager_engine": eager_s / run_s,
                        "plain_compiled_speedup_over_eager_plain": plain_s / plain_compiled_s,
                        "plain_compiled_ms_per_sample": 1e3 * plain_compiled_s / n,
                    }
                )
    return rows


def _stage_fractions(flops: Any) -> list[float]:
    """Each backbone stage's share of the plain backbone's FLOPs (the classifier counted in the last)."""
    through = flops.per_exit("flops")
    heads = flops.per_head("flops")
    stages, prev = [], 0.0
    for k in range(len(through)):
        upto = through[k] - sum(heads[: k + 1])
        stages.append(upto - prev)
        prev = upto
    stages[-1] += heads[-1]
    return [s / flops.backbone["flops"] for s in stages]


# glibc's default malloc serves large tensors (a ResNet-56 stage-1 activation at batch 128 is 8 MB)
# with fresh mmap'd pages and returns them at free, so every large tensor pays its page faults
# again: up to half of the first group's CPU time, and how much depends on how long tensors live,
# which the engine changes. PyTorch's CPU allocator does not cache; these glibc tunables keep
# freed memory in the process instead, for all runners alike.
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's, this machine's cores)"
    )
    ap.add_argument("--backbones", nargs="*", default=CPU_BACKBONES, choices=list(BACKBONES))
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: inputs, network and decisions on the GPU")
    ap.add_argument("--batch-sizes", nargs="*", type=int, default=[128, 1], choices=[128, 1])
    ap.add_argument(
        "--samples",
        type=int,
        default=None,
        help="stream length (a multiple of 10; default 1280 at batch 128, 300 at 1)",
    )
    ap.add_argument(
        "--update",
        action="store_true",
        help="replace only the rows of the backbones, batch sizes and modes run here in --out",
    )
    ap.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's default malloc settings (see MALLOC_TUNED)"
    )
    ap.add_argument("--compile", action="store_true", help="add the torch.compile rows (engine_compiled)")
    add_output_args(ap)
    args = ap.parse_args()
    if not args.default_malloc and any(os.environ.get(k) != v for k, v in MALLOC_TUNED.items()):
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_TUNED}
        )  # glibc reads them at start
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    sizes = {128: 130 if args.quick else 1280, 1: 10 if args.quick else 300}  # exact mixes need multiples of 10
    if args.samples is not None:
        sizes = dict.fromkeys(sizes, args.samples)
    sizes = {b: n for b, n in sizes.items() if b in args.batch_sizes}
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for name in args.backbones:
        for batch_size, n in sizes.items():
            new = bench_backbone(
                name, BACKBONES[name], batch_size, n, repeats, seed=0, compile=args.compile, device=args.device
            )
            for r in new:
                print(
                    f"{r['backbone']:>20} {r['mode']:>8} b={r['batch_size']:<4} {r['exit_mix']}  predicted flops "
                    f"{r['flops_predicted_speedup']:.3f} latency {r['latency_predicted_speedup']:.3f}  realised "
                    f"{r['realised_speedup']:.3f}  ratio {r['latency_ratio']:.3f}  policy "
                    f"{r['policy_overhead_pct']:.3f}%",
                    flush=True,
                )
            rows += new
    env = {
        "malloc": "glibc default" if args.default_malloc else MALLOC_TUNED,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    for r in rows:
        r["env"] = env
    out = output_path(args, OUT)
    if args.update and out.is_file():
        ran = {(r["backbone"], r["batch_size"], r["mode"]) for r in rows}
        rows += [
            r for r in json.loads(out.read_text())["rows"] if (r["backbone"], r["batch_size"], r["mode"]) not in ran
        ]
        rows.sort(key=lambda r: (list(BACKBONES).index(r["backbone"]), -r["batch_size"], r["exit_mix"], r["mode"]))
    write_result(out, {"rows": rows})
    print(
        f"wrote {out} (load average before {load_before[0]:.2f}, after {env['load_avg_after'][0]:.2f} "
        f"on {env['cores']} cores, {env['threads']} threads)"
    )


if __name__ == "__main__":
    main()
