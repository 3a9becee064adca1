"""The acceptance of the Python API: in a new virtual environment, ``pip install -e .``, train and fit
a digits model with the installed apps, then run the README's ten-line round trip (eenn.load,
predict with a policy, save_pretrained, from_pretrained in a new process without Hydra, identical
predictions).

The venv is new and eenn is installed into it by pip from a copy of this checkout. Its
dependencies (torch alone is gigabytes) are not downloaded again: a ``.pth`` file shows pip and the
venv this interpreter's site-packages, and pip installs with ``--no-index``, so every dependency
pyproject.toml declares must be found there and the test needs no network (the build tools, pip and
setuptools, come from there too)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.api.readme import readme_block, with_paths

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "data=digits",
    "exits=early",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "cost.latency=false",
    "trainer.enable_progress_bar=false",
]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def _run(args: list[str], cwd: Path, timeout: int = 900, **env: str) -> str:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args[:3]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _copy_checkout(dest: Path) -> Path:
    """The files of this checkout that git would commit (tracked, or new and not ignored)."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.slow
def test_pip_install_then_the_readme_round_trip_in_a_fresh_venv(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy")
    src = _copy_checkout(tmp_path / "src")
    venv = tmp_path / "venv"
    # no pip of its own: the venv's bundled setuptools (older, without wheel) would shadow the tools
    # beside the dependencies; this interpreter's pip runs in the venv and installs into it
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "_eenn_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "--quiet", "--no-index", "--no-build-isolation", "-e", src], tmp_path)
    where = _run([py, "-c", "import eenn; print(eenn.__file__)"], tmp_path).strip()
    assert Path(where).resolve() == (src / "eenn" / "__init__.py").resolve()  # the venv's own install

    work = tmp_path / "work"
    work.mkdir()
    run, fit = work / "run", work / "fit"
    _run([venv / "bin" / "eenn-train", *TINY, f"hydra.run.dir={run}"], work)
    _run(
        [
            venv / "bin" / "eenn-fit",
            f"run_dir={run}",
            "policy=maxprob",
            "budget.fraction=0.5",
            "wandb.enabled=false",
            f"hydra.run.dir={fit}",
        ],
        work,
    )
    script = work / "readme.py"
    script.write_text(with_paths(readme_block("test_fresh_venv.py"), run, fit))
    _run([py, script], work)  # its own asserts: no hydra in the new process, identical predictions
    assert (work / "digits-resnet20" / "README.md").is_file() and (work / "classes.pt").is_file()


@pytest.mark.slow
def test_from_pretrained_in_a_new_process_imports_neither_hydra_nor_lightning(digits, tmp_path):
    import eenn

    out = eenn.load(digits.run, policy=digits.fit).save_pretrained(tmp_path / "model")
    code = (
        "import sys, eenn; light = 'torch' not in sys.modules; m = eenn.from_pretrained(sys.argv[1]); "
        "print(light, m.policy.name, sorted({n.split('.')[0] for n in sys.modules} & "
        "{'hydra', 'omegaconf', 'lightning', 'pytorch_lightning'}))"
    )
    # this checkout's eenn, whatever the interpreter has installed
    assert _run([sys.executable, "-c", code, out], tmp_path, PYTHONPATH=str(REPO)).split() == ["True", "maxprob", "[]"]
