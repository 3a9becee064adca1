"""Any timm CNN, cut into units along its feature stages (timm's ``feature_info``)."""

from __future__ import annotations

from pathlib import Path

import timm
from torch import nn

from eenn.errors import EENNError
from eenn.models.backbones.base import BACKBONES, BackboneParts

# Children that timm's forward_head runs (pooling, dropout, classifier): everything before the
# first of them is forward_features, run in order by the models this split supports.
_HEAD_CHILDREN = ("global_pool", "head_drop", "fc_norm", "head", "fc", "classifier")


@BACKBONES.register("timm")
def timm_backbone(
    num_classes: int,
    model: str = "resnet18",
    in_chans: int = 3,
    pretrained: bool = False,
    checkpoint: str | None = None,
    **model_kwargs: object,
) -> BackboneParts:
    """``timm.create_model(model)`` split into units; ``checkpoint`` loads local weights (offline)."""
    if model not in timm.list_models():
        raise EENNError(f"backbone.model={model!r} is not a timm model (see timm.list_models()).")
    overlay = None
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise EENNError(f"backbone.checkpoint={checkpoint!r} does not exist.")
        pretrained, overlay = True, {"file": str(checkpoint)}
    try:
        net = timm.create_model(
            model, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans,
            pretrained_cfg_overlay=overlay, **model_kwargs,
        )
    except (OSError, RuntimeError) as exc:
        if pretrained and checkpoint is None:
            raise EENNError(
                f"backbone.pretrained=true could not fetch {model}'s weights ({type(exc).__name__}); "
                "without network, pass a local file as backbone.checkpoint=<path>."
            ) from None
        raise
    stage_modules = [info["module"] for info in net.feature_info]
    containers = {m.split(".")[0] for m in stage_modules if "." in m}
    units: list[tuple[str, nn.Module]] = []
    head: list[nn.Module] = []
    for child_name, child in net.named_children():
        if child_name in _HEAD_CHILDREN or head:
            if child_name in _HEAD_CHILDREN:
                head.append(child)
            continue
        if child_name in containers:
            units += [(f"{child_name}.{n}", m) for n, m in child.named_children()]
        else:
            units.append((child_name, child))
    drop_rate = float(getattr(net, "drop_rate", 0.0) or 0.0)
    if drop_rate > 0 and not hasattr(net, "head_drop"):  # forward_head applies it functionally
        head.insert(len(head) - 1, nn.Dropout(drop_rate))
    if not head:
        raise EENNError(f"backbone.model={model!r}: no pooling/classifier children found to split off as its head.")
    names = [n for n, _ in units]
    missing = [m for m in stage_modules if m not in names]
    if missing:
        raise EENNError(f"backbone.model={model!r}: its feature stages {missing} are not top-level units; this model cannot be split.")
    first_stage = names.index(stage_modules[0])
    return BackboneParts(
        units=units,
        head=nn.Sequential(*head),
        blocks=names[first_stage:],
        stages={m: m for m in stage_modules},
    )
