"""A run's saved config: resolved with absolute paths (so that the run dir works from any working
directory), compared with another config key by key (what a resume or a re-run may not change),
and read in today's key names (registry keys renamed since the run was saved)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from eenn.utils.nested import flatten

#: config values that are paths: saved absolute, so that a run dir works from any working directory
PATH_KEYS = ("data.root", "data.path", "run_dir", "resume")


def resolved_config(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """``cfg`` (without Hydra's node) as the run in ``run_dir`` saves it: resolved, with that dir as
    ``paths.output_dir`` and every path (``paths.*``, :data:`PATH_KEYS`) absolute."""
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
        if "paths" in cfg:
            cfg.paths.output_dir = str(Path(run_dir).resolve())
    out: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    for key in [f"paths.{k}" for k in out.get("paths", {})] + list(PATH_KEYS):
        parent, _, leaf = key.rpartition(".")
        node = out.get(parent) if parent else out
        if isinstance(node, dict) and isinstance(node.get(leaf), str):
            node[leaf] = os.path.abspath(node[leaf])
    return out


def config_differences(saved: Any, now: dict[str, Any], may_change: tuple[str, ...]) -> str:
    """The keys (and both values, up to four) where two resolved configs of one run differ, beyond
    ``may_change`` and the task's name; "" when none. Paths inside the run dir (its checkpoints...)
    follow the dir when it is moved or copied."""

    def relative(flat: dict[str, Any]) -> dict[str, Any]:
        root = flat.get("paths.output_dir")  # absent from a config saved unresolved
        return {
            k: v.replace(str(root), "<run dir>") if isinstance(v, str) and root else v
            for k, v in flat.items()
            if k != "task_name"
        }

    before, after = relative(flatten(saved)), relative(flatten(now))
    differ = [
        k
        for k in sorted(set(before) | set(after))
        if before.get(k, "<unset>") != after.get(k, "<unset>")
        and not any(k == p or k.startswith(p + ".") for p in may_change)
    ]
    shown = "; ".join(f"{k}: {before.get(k, '<unset>')!r} -> {after.get(k, '<unset>')!r}" for k in differ[:4])
    return shown + (f" (and {len(differ) - 4} more)" if len(differ) > 4 else "")


def rename_registry_keys(cfg: DictConfig) -> None:
    """Runs saved before every registry key was ``name`` say ``backbone.family`` (with a timm
    backbone's model in ``backbone.name``) and ``exits.head.type``: read them as they are said now."""
    backbone, head = cfg.get("backbone"), OmegaConf.select(cfg, "exits.head")
    if backbone is not None and "family" in backbone:
        if "name" in backbone:
            backbone.model = backbone.pop("name")
        backbone.name = backbone.pop("family")
    if head is not None and "type" in head:
        head.name = head.pop("type")
