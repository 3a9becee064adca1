"""A read-only run dir is refused in one sentence, checked where the tests run as root (CI): root
writes into read-only dirs, so tests/reliability/test_bad_inputs.py skips its own version there,
and this one runs eenn-fit as the unprivileged user nobody (uid 65534) through ``setpriv``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from eenn.policies.synthetic import synthetic_predictions

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="not root: test_bad_inputs.py's own read-only case runs")
def test_a_read_only_run_dir_is_refused_for_an_unprivileged_user() -> None:
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to run this check as an unprivileged user"
    # not pytest's tmp_path: its root-owned parents are closed to other users
    work = Path(tempfile.mkdtemp(prefix="eenn_ro_"))
    try:
        work.chmod(0o755)
        run = work / "run"  # a stage-1 run as eenn-fit reads it: its two predictions files
        synthetic_predictions(100, seed=0).save(run / "predictions" / "val.safetensors")
        synthetic_predictions(100, seed=1, split="test").save(run / "predictions" / "test.safetensors")
        for p in [run, *run.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        home, ro = work / "home", work / "ro"
        home.mkdir()
        ro.mkdir(mode=0o555)
        ro.chmod(0o555)  # mkdir's mode goes through the umask
        import matplotlib

        # matplotlib's font cache, so that a fresh HOME does not announce building one on stderr
        shutil.copytree(matplotlib.get_cachedir(), home / ".cache" / "matplotlib", dirs_exist_ok=True)
        for p in [home, *home.rglob("*")]:
            os.chown(p, NOBODY, NOBODY)
        env = {
            **os.environ,
            "HOME": str(home),
            "EENN_ROOT": str(home),
            "WANDB_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        proc = subprocess.run(
            [
                setpriv,
                f"--reuid={NOBODY}",
                f"--regid={NOBODY}",
                "--clear-groups",
                sys.executable,
                "-m",
                "eenn.cli.fit",
                f"run_dir={run}",
                f"hydra.run.dir={ro}",
            ],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stdout + proc.stderr
        assert len(lines) == 1 and lines[0] == f"error: run dir '{ro}' cannot be written: Permission denied.", lines
        assert list(ro.iterdir()) == []  # nothing half-made inside
    finally:
        shutil.rmtree(work, ignore_errors=True)
