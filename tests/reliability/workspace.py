"""What the reliability tests share: the tiny stage-1 recipe, a config composed as an app composes
it, the apps' console scripts run in-process, and the checks every bad input must pass."""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from unittest import mock

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from eenn.cli.common import conf_dir

TRAIN = [
    "data=digits",
    "logger=csv",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "cost.latency=false",
    "trainer.enable_progress_bar=false",
]


def compose_run(name: str, overrides: list[str], out: Path) -> DictConfig:
    """The config of app ``name`` with ``overrides``, writing into ``out``."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.paths.root_dir = str(out.parent)
    return cfg


def run_app(app: str, args: list[str], capsys) -> tuple[int, str, str]:
    """Run ``eenn-<app> args`` as its console script does, in this process: (exit code, stdout, stderr)."""
    main = importlib.import_module(f"eenn.cli.{app}").main
    capsys.readouterr()  # what fixtures printed
    handlers = logging.root.handlers[:]
    with mock.patch.object(sys, "argv", [f"eenn-{app}", *args]):
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:  # Hydra's logging writes to this test's captured streams: later tests get theirs
            logging.root.handlers[:] = handlers
    out = capsys.readouterr()
    return code, out.out, out.err


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and dir (None) under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def assert_one_sentence(code: int, out: str, err: str, expected_code: int, *fragments: str) -> None:
    """Exit code ``expected_code``, no traceback, and at most 3 lines on stderr, the first the error."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == expected_code, err[-3000:]
    assert "Traceback" not in out + err
    assert 1 <= len(lines) <= 3 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
