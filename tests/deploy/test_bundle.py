"""eenn-export end to end on a tiny stage-1 run: the bundle's files and manifest, the runtime next
to the engine, eenn-infer runtime=onnxruntime, refusals of tampered bundles, and a runtime that
runs with numpy and onnxruntime alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from eenn.deploy import Bundle, Runtime
from eenn.deploy.bundle import sha256
from eenn.errors import EENNError
from eenn.inference.engine import EarlyExitEngine, batches_of
from eenn.rundir import FitRun, TrainRun
from eenn.tasks.build import datamodule, load_network
from eenn.tasks.export import export
from eenn.tasks.fit import fit_run
from eenn.tasks.infer import infer, load_split
from eenn.tasks.train import train
from tests.inference.test_infer_run import _compose

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A stage-1 run (ResNet-20 on digits, one epoch), maxprob, DEEx and PABEE fits, and their bundles."""
    root = tmp_path_factory.mktemp("eenn")
    dirs = {"run": root / "train", **{name: root / f"fit_{name}" for name in ("maxprob", "deex", "patience")}}
    train(
        _compose(
            "train",
            [
                "data=digits",
                "backbone=resnet20",
                "exits=stages",
                "logger=csv",
                "trainer.max_epochs=1",
                "cost.repeats=2",
                "trainer.enable_progress_bar=false",
            ],
            root,
            dirs["run"],
        )
    )
    fits = {
        "maxprob": ["policy=maxprob", "budget.fraction=0.7"],
        "deex": ["policy=deex", "policy.p_tar=0.8", "budget.fraction=0.8"],
        "patience": ["policy=patience", "policy.patience=1"],
    }  # PABEE keeps state: its graphs hand it on
    for name, overrides in fits.items():
        fit_run(
            _compose("fit", [f"run_dir={dirs['run']}", *overrides, "wandb.enabled=false"], root, dirs[name]), dirs[name]
        )
        out = root / f"export_{name}"
        export(_compose("export", [f"policy_dir={dirs[name]}", "check.batch_size=32"], root, out), out)
        dirs[f"export_{name}"] = out
    return dirs


def test_the_bundle_holds_a_graph_per_segment_the_policy_and_a_checked_manifest(exported):
    b = Bundle(exported["export_maxprob"])  # the run dir: its bundle/
    assert b.path == exported["export_maxprob"] / "bundle"
    m = b.manifest
    K = b.num_exits
    assert (
        K == 3 and b.input_shape == (1, 8, 8) and b.num_classes == 10 and b.class_names == [str(i) for i in range(10)]
    )
    assert sorted(m["files"]) == sorted(
        ["backbone.onnx", "policy.json", "policy.safetensors"] + [f"segment_{k}.onnx" for k in range(K)]
    )
    for name, digest in m["files"].items():
        assert sha256(b.path / name) == digest
    assert [e["segment"] for e in m["exits"]] == [f"segment_{k}.onnx" for k in range(K)]
    # the decision is in the graph (maxprob keeps no state); the last exit answers for everyone
    assert m["exits"][0]["inputs"] == ["image"] and m["exits"][0]["outputs"] == ["h_out", "logits", "exit"]
    assert m["exits"][1]["inputs"] == ["h_in"] and m["exits"][1]["outputs"] == ["h_out", "logits", "exit"]
    assert m["exits"][-1]["outputs"] == ["logits"] and m["policy"]["state"] == []
    costs = TrainRun(exported["run"]).costs()
    assert b.cost("macs") == costs.per_exit("macs")
    assert m["source"]["run_dir"] == str(exported["run"]) and m["source"]["policy_sha256"] == sha256(
        FitRun(exported["maxprob"]).policy_file
    )
    assert m["opset"] == 18 and m["eenn_version"] and m["input"]["normalisation"]["mean"]
    check = m["check"]
    assert check["atol"] == check["rtol"] == 1e-4 and check["batch_size"] == 32
    assert set(check["max_abs_error"]) == {f"segment_{k}.onnx" for k in range(K)} | {"backbone.onnx"}
    assert all(0 <= e <= 1e-3 for errs in check["max_abs_error"].values() for o, e in errs.items() if o != "exit")
    assert all(errs.get("exit", 0) <= 1 / 32 for errs in check["max_abs_error"].values())  # a tie at most
    import onnx

    for k in range(K):  # every output named, the batch axis dynamic
        g = onnx.load(str(b.path / f"segment_{k}.onnx")).graph
        assert [o.name for o in g.output] == m["exits"][k]["outputs"]
        assert g.input[0].type.tensor_type.shape.dim[0].dim_param
    policy = json.loads((b.path / "policy.json").read_text())
    assert policy["name"] == "maxprob" and policy["num_exits"] == K
    assert b.policy()["arrays"]["thresholds"].shape == (K,)


@pytest.mark.parametrize("policy", ["maxprob", "deex"])
@pytest.mark.parametrize("batch_size", [1, 64])
def test_the_runtime_takes_the_engines_exits_and_logits(exported, policy, batch_size):
    run = TrainRun(exported["run"])
    dm = datamodule(run)
    dm.setup("test")
    x, y = load_split(dm, "test")
    if batch_size == 1:  # one request at a time: a slice is enough
        x, y = x[:60], y[:60]
    net = load_network(run, "best", dm)
    eager = EarlyExitEngine(net, FitRun(exported[policy]).policy()).run(batches_of(x, batch_size, y))
    rt = Runtime(exported[f"export_{policy}"], threads=1)
    out = rt.predict(x.numpy(), batch_size=batch_size)
    ties = int((out.exits != eager.exit_index.numpy()).sum())
    assert ties / len(y) < 1e-3
    same = out.exits == eager.exit_index.numpy()
    np.testing.assert_allclose(out.logits[same], eager.logits.numpy()[same], rtol=0, atol=1e-4)
    np.testing.assert_array_equal(out.heads, eager.heads_evaluated.numpy())
    np.testing.assert_array_equal(out.classes, out.logits.argmax(-1))
    assert len(np.unique(out.exits)) >= 2
    # compaction: each stage ran on the samples still in, nothing more
    assert [sum(s) for s in out.stage_batch_sizes] == [int((out.exits >= k).sum()) for k in range(3)]
    if policy == "deex":  # offloaded samples skipped the middle head
        assert (~out.heads[:, 1] & (out.exits == 2)).any() and (rt.bundle.path / "stage_1.onnx").is_file()
    assert out.decision_s > 0 and out.latency_ms.shape == (len(y),) and (out.latency_ms > 0).all()
    np.testing.assert_array_equal(
        rt.predict_backbone(x[:16].numpy(), 8).argmax(-1), net.forward_backbone(x[:16]).argmax(-1).numpy()
    )


def test_eenn_infer_runs_the_bundle_and_prints_the_same_table(exported, tmp_path, capsys):
    cfg = _compose(
        "infer",
        [
            "runtime=onnxruntime",
            f"bundle={exported['export_maxprob']}",
            "batch_size=64",
            "timing_repeats=2",
            "threads=1",
        ],
        tmp_path,
        tmp_path,
    )
    out = infer(cfg, tmp_path)
    printed = capsys.readouterr().out
    for row in ("expected", "realised", "% exit ", "Average MACs/input", "Speedup", "Measured wall-time speedup"):
        assert row in printed, row
    assert out["runtime"] == "onnxruntime" and out["run_dir"] == str(exported["run"])
    assert out["agreement"]["exit_index"] >= 0.99
    assert out["timing"]["backbone_s"] > 0 and len(out["timing"]["engine_s_passes"]) == 2


def tampered(exported, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(exported["export_maxprob"] / "bundle", copy)
    return copy


def test_a_changed_file_is_refused_by_its_checksum(exported, tmp_path):
    b = tampered(exported, tmp_path)
    with open(b / "segment_1.onnx", "r+b") as fh:
        fh.seek(200)
        byte = fh.read(1)
        fh.seek(200)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(EENNError, match=r"segment_1.onnx' does not match the sha256 its manifest records"):
        Runtime(b)


def test_a_missing_segment_is_refused_by_name(exported, tmp_path):
    b = tampered(exported, tmp_path)
    (b / "segment_2.onnx").unlink()
    with pytest.raises(EENNError, match=r"lacks 'segment_2.onnx', which its manifest lists"):
        Runtime(b)
    m = json.loads((b / "manifest.json").read_text())
    del m["files"]["segment_2.onnx"]
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EENNError, match=r"does not list 'segment_2.onnx' under 'files'"):
        Runtime(b)


def test_a_manifest_without_a_key_or_of_another_format_is_refused(exported, tmp_path):
    b = tampered(exported, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "input"}))
    with pytest.raises(EENNError, match=r"manifest.json' lacks the key 'input'"):
        Bundle(b)
    (b / "manifest.json").write_text(json.dumps({**m, "format": "other/2"}))
    with pytest.raises(EENNError, match=r"has format 'other/2', expected 'eenn.bundle/2'\.$"):
        Bundle(b)
    (b / "manifest.json").write_text(
        json.dumps({**m, "format": "eenn.bundle/1"})
    )  # its decisions were not in the graphs
    with pytest.raises(
        EENNError,
        match=r"has format 'eenn.bundle/1', expected 'eenn.bundle/2': an older eenn-export "
        r"wrote it; export the bundle again\.",
    ):
        Bundle(b)
    (b / "manifest.json").write_text("{")
    with pytest.raises(EENNError, match=r"manifest.json' is not valid JSON"):
        Bundle(b)


def test_a_wrong_input_shape_is_refused_naming_the_manifest_key(exported):
    rt = Runtime(exported["export_maxprob"])
    with pytest.raises(
        EENNError, match=r"input of shape \(2, 3, 8, 8\) does not match the manifest's input.shape \[1, 8, 8\]"
    ):
        rt.predict(np.zeros((2, 3, 8, 8), dtype=np.float32))
    with pytest.raises(EENNError, match=r"uint8 images: normalise them first"):
        rt.predict(np.zeros((2, 1, 8, 8), dtype=np.uint8))
    out = rt.predict(rt.bundle.normalise(np.zeros((2, 1, 8, 8), dtype=np.uint8)))
    assert out.num_samples == 2


def test_a_bad_policy_file_in_the_bundle_is_refused(exported, tmp_path):
    b = tampered(exported, tmp_path)
    spec = json.loads((b / "policy.json").read_text())
    (b / "policy.json").write_text(json.dumps({**spec, "name": "oracle"}))
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["policy.json"] = sha256(b / "policy.json")
    (b / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        EENNError,
        match=r"policy.json' names the policy 'oracle', but the manifest's graphs were "
        r"exported with 'maxprob'",
    ):
        Runtime(b)


def test_a_bundle_runs_from_its_manifest_alone_as_the_readme_shows(exported):
    """The README's loop: ONNX Runtime and the manifest's names, no eenn; the same exits and logits
    as the Runtime, for a policy with state (PABEE's) and one without."""
    import onnxruntime as ort

    readme = (REPO / "README.md").read_text()
    code = readme.split("import json, onnxruntime as ort\n", 1)[1].split("```", 1)[0]
    dm = datamodule(TrainRun(exported["run"]))
    dm.setup("test")
    x = load_split(dm, "test")[0][:60].numpy()
    for name in ("export_maxprob", "export_patience"):
        scope = {"json": json, "ort": ort, "bundle": str(exported[name] / "bundle")}
        exec(code, scope)
        got = [scope["predict_one"](x[i : i + 1]) for i in range(len(x))]
        want = Runtime(exported[name]).predict(x, batch_size=1)
        assert [k for k, _ in got] == want.exits.tolist() and len(set(want.exits.tolist())) >= 2, name
        np.testing.assert_allclose(np.stack([lg for _, lg in got]), want.logits, rtol=0, atol=1e-6)
    assert Bundle(exported["export_patience"]).state_names == ["count", "prev"]


#: what the runtime may import beyond the standard library: numpy, onnxruntime and what
#: onnxruntime itself depends on (pip installs those with it)
ALLOWED = ("numpy", "onnxruntime")


def test_the_runtime_runs_with_numpy_and_onnxruntime_alone(exported, tmp_path):
    """In a fresh interpreter that sees the standard library, eenn and only the distributions of
    numpy and onnxruntime (and onnxruntime's own requirements): no torch to find at all."""
    site = tmp_path / "site"
    site.mkdir()
    names = set(ALLOWED)
    for req in metadata.requires("onnxruntime") or []:
        if "extra ==" not in req:
            names.add(req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("~")[0].strip())
    for dist_name in names:
        dist = metadata.distribution(dist_name)
        tops = (dist.read_text("top_level.txt") or "").split() or [dist_name.replace("-", "_")]
        for top in tops:
            for cand in (Path(dist.locate_file(top)), Path(dist.locate_file(f"{top}.py"))):
                if cand.exists() and not (site / cand.name).exists():
                    (site / cand.name).symlink_to(cand)
        libs = Path(dist.locate_file(f"{dist_name}.libs"))
        if libs.exists():
            (site / libs.name).symlink_to(libs)
    (site / "eenn").symlink_to(REPO / "eenn")
    x = np.random.default_rng(0).normal(size=(20, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    code = textwrap.dedent(f"""
        import sys
        sys.path = [p for p in sys.path if "site-packages" not in p and "dist-packages" not in p] + [{str(site)!r}]
        import numpy as np
        from eenn.deploy import Runtime
        out = Runtime({str(exported["export_maxprob"])!r}).predict(np.load({str(tmp_path / "x.npy")!r}), batch_size=8)
        heavy = sorted(m for m in sys.modules
                       if m.split(".")[0] in ("torch", "lightning", "timm", "hydra", "omegaconf"))
        print(out.exits.tolist(), heavy)
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    exits, heavy = proc.stdout.strip().rsplit(" [", 1)
    assert heavy == "]"  # nothing of torch (nor of eenn's training stack) was imported
    expected = Runtime(exported["export_maxprob"]).predict(x, batch_size=8).exits.tolist()
    assert json.loads(exits) == expected
    # and the interpreter could not have found torch had the runtime asked for it
    probe = subprocess.run(
        [sys.executable, "-S", "-c", code.replace("from eenn.deploy import Runtime", "import torch")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "No module named 'torch'" in probe.stderr


def _tamper_checksum(exported, ws: Path) -> str:
    b = tampered(exported, ws)
    (b / "policy.json").write_text((b / "policy.json").read_text().replace('"maxprob"', '"maxprob" '))
    return str(b)


# (case, app, args, fragments of the one-sentence error, prepare(exported, ws) -> {X}); {M} the
# finished maxprob export, {F} its fit, {O} an oracle's fit, {N} a new dir
CLI_CASES = [
    (
        "export into a finished export",
        "export",
        ["policy_dir={F}", "hydra.run.dir={M}"],
        ["holds a finished eenn-export run", "force=true"],
        None,
    ),
    (
        "export an oracle",
        "export",
        ["policy_dir={O}", "hydra.run.dir={N}"],
        ["policy 'oracle' reads the labels (an oracle), so it cannot be deployed"],
        None,
    ),
    (
        "export to another format",
        "export",
        ["policy_dir={F}", "format=tflite", "hydra.run.dir={N}"],
        ["format must be one of ('onnx',), got 'tflite'"],
        None,
    ),
    (
        "export at opset 12",
        "export",
        ["policy_dir={F}", "opset=12", "hydra.run.dir={N}"],
        ["opset must be an integer >= 18, got 12"],
        None,
    ),
    (
        "infer on onnxruntime without a bundle",
        "infer",
        ["runtime=onnxruntime", "hydra.run.dir={N}"],
        ["runtime=onnxruntime needs bundle="],
        None,
    ),
    (
        "infer a bundle on the torch runtime",
        "infer",
        ["bundle={M}", "hydra.run.dir={N}"],
        ["bundle= is read by runtime=onnxruntime only"],
        None,
    ),
    (
        "infer a bundle with rebatching",
        "infer",
        ["runtime=onnxruntime", "bundle={M}", "mode=rebatch", "hydra.run.dir={N}"],
        ["mode=rebatch is the torch engine's"],
        None,
    ),
    (
        "infer a bundle changed after export",
        "infer",
        ["runtime=onnxruntime", "bundle={X}", "hydra.run.dir={N}"],
        ["policy.json' does not match the sha256 its manifest records"],
        _tamper_checksum,
    ),
    (
        "infer a bundle with another policy",
        "infer",
        ["runtime=onnxruntime", "bundle={M}", "policy_dir={D}", "hydra.run.dir={N}"],
        ["is not the one bundle", "was exported with"],
        None,
    ),
]


@pytest.fixture(scope="module")
def oracle_fit(exported, tmp_path_factory) -> Path:
    fit = tmp_path_factory.mktemp("oracle") / "fit"
    fit_run(
        _compose("fit", [f"run_dir={exported['run']}", "policy=oracle", "wandb.enabled=false"], fit.parent, fit), fit
    )
    return fit


@pytest.mark.parametrize(("case", "app", "args", "fragments", "prepare"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_input_to_export_and_the_bundle_runtime_is_one_sentence(
    case, app, args, fragments, prepare, exported, oracle_fit, tmp_path, capsys
):
    from tests.reliability.workspace import assert_one_sentence, run_app, snapshot

    places = {
        "M": str(exported["export_maxprob"]),
        "F": str(exported["maxprob"]),
        "O": str(oracle_fit),
        "D": str(exported["deex"]),
        "N": str(tmp_path / "new"),
    }
    if prepare is not None:
        places["X"] = prepare(exported, tmp_path)
    before = snapshot(exported["export_maxprob"])
    code, out, err = run_app(app, [a.format(**places) for a in args], capsys)
    assert_one_sentence(code, out, err, 2, *[f.format(**places) for f in fragments])
    assert snapshot(exported["export_maxprob"]) == before
    assert not (tmp_path / "new").exists()


def test_eenn_export_prints_its_summary_and_none_of_the_exporters_chatter(exported, tmp_path, capsys):
    from tests.reliability.workspace import run_app

    code, out, err = run_app(
        "export", [f"policy_dir={exported['maxprob']}", "baseline=false", f"hydra.run.dir={tmp_path / 'e'}"], capsys
    )
    assert code == 0, err[-2000:]
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert [line.split(":")[0] for line in lines] == [
        "bundle",
        "checked in ONNX Runtime against PyTorch on 64 val samples",
    ]
    assert Bundle(tmp_path / "e").manifest["backbone"] is None
