"""Any timm model, cut into units that reproduce it, or refused by name.

CNNs (and Swin-like hierarchical transformers) are cut along their feature stages (timm's
``feature_info``); vision transformers (ViT, DeiT, distilled DeiT) into an embedding unit
(everything timm's ``forward_features`` does before the first block), one unit per block, and the
head (final norm, pooling, classifier). Every part runs timm's own code: its modules and its
methods (``_pos_embed``, ``forward_head``), never a copy of them. Building checks on the data's
input shape that the units composed with the head give what ``timm.create_model(...)(x)`` gives;
a model whose forward does work the split cannot see is refused with one sentence, never trained
as a silently different network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from eenn.errors import EENNError
from eenn.models.backbones.base import BACKBONES, BackboneParts, Tokens

DEFAULT_MODEL = "resnet18"
# Children that timm's forward_head runs (pooling, dropout, classifier): everything before the
# first of them is forward_features, run in order by the CNNs this split supports.
_HEAD_CHILDREN = ("global_pool", "head_drop", "fc_norm", "head", "fc", "classifier")
_MODULE_STATE = frozenset(vars(nn.Module()))  # nn.Module's own bookkeeping, not a model's settings
ATOL = 1e-5  # how far the split's logits may be from the whole model's (float32, same weights)


class TimmPart(nn.Module):
    """Runs ``steps`` of a timm model in order, each a child module or a method of the model's
    class, on a shell of the model: an instance of its class that holds this part's children and
    parameters (the same objects, so weights are shared, not copied) and all its settings. A step
    that reaches for another part's module fails, instead of running it a second time."""

    def __init__(self, net: nn.Module, keep: Iterable[str], steps: Sequence[str]) -> None:
        super().__init__()
        shell = type(net).__new__(type(net))
        nn.Module.__init__(shell)
        shell.__dict__.update({k: v for k, v in vars(net).items() if k not in _MODULE_STATE})
        for name in keep:
            setattr(shell, name, getattr(net, name))
        self.model = shell
        self.steps = list(steps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = getattr(self.model, step)(x)
        return x


def _own_tensors(net: nn.Module) -> list[str]:
    return [n for n, t in [*net.named_parameters(recurse=False), *net.named_buffers(recurse=False)]]


def _stage_split(net: nn.Module) -> tuple[list[tuple[str, nn.Module]], nn.Module, list[str], Tokens | None]:
    """CNN-like: the children before the head run in order (feature-stage containers cut into
    their stages), then timm's ``forward_head`` on the rest. Channels-last models (Swin) hand on
    (B, H, W, C) tokens, pooled as their head pools them."""
    containers = {m.split(".")[0] for m in (i["module"] for i in net.feature_info) if "." in m}
    units: list[tuple[str, nn.Module]] = []
    children = list(net.named_children())
    first_head = next((i for i, (n, _) in enumerate(children) if n in _HEAD_CHILDREN), len(children))
    for child_name, child in children[:first_head]:
        if child_name in containers:
            units += [(f"{child_name}.{n}", m) for n, m in child.named_children()]
        else:
            units.append((child_name, child))
    head = TimmPart(net, [n for n, _ in children[first_head:]] + _own_tensors(net), ["forward_head"])
    tokens = None
    if getattr(net, "output_fmt", "NCHW") == "NHWC":
        pool = getattr(net, "global_pool", "avg")
        tokens = Tokens(pool=pool if isinstance(pool, str) and pool else "avg")
    return units, head, [m for m in (i["module"] for i in net.feature_info)], tokens


def _vit_split(net: VisionTransformer) -> tuple[list[tuple[str, nn.Module]], nn.Module, list[str], Tokens | None]:
    """ViT/DeiT: an embedding unit (patch embedding, class/register/distillation tokens, position
    embedding and its dropout, patch dropout, pre-norm: timm's own ``_pos_embed``), one unit per
    block, and a head that is the final norm and timm's ``forward_head`` (pooling per
    ``global_pool``, fc_norm, dropout, classifier; distilled DeiT's two classifiers averaged)."""
    children = list(net._modules)
    at = children.index("blocks")
    embed = TimmPart(net, children[:at] + _own_tensors(net), ["patch_embed", "_pos_embed", "patch_drop", "norm_pre"])
    units = [("embed", embed), *((f"blocks.{i}", b) for i, b in enumerate(net.blocks))]
    head = TimmPart(net, children[at + 1 :], ["norm", "forward_head"])
    # an attention-pooled model's ('map') exits pool the patch tokens evenly instead
    pool = "avg" if net.global_pool in ("map", "") else net.global_pool
    tokens = Tokens(pool=pool, prefix_tokens=net.num_prefix_tokens, include_prefix=net.pool_include_prefix)
    return units, head, [u for u, _ in units[1:]], tokens


# timm classes split otherwise than along their children (found along the class's MRO, so that
# DeiT's VisionTransformerDistilled is split as a ViT); every other model: _stage_split
_SPLITS: dict[type, Callable[..., tuple[list[tuple[str, nn.Module]], nn.Module, list[str], Tokens | None]]] = {
    VisionTransformer: _vit_split,
}


def _split(net: nn.Module) -> tuple[list[tuple[str, nn.Module]], nn.Module, list[str], Tokens | None]:
    return next((_SPLITS[c] for c in type(net).__mro__ if c in _SPLITS), _stage_split)(net)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _unsplittable(model: str, net: nn.Module, why: str) -> EENNError:
    return EENNError(
        f"backbone.name={model!r} ({type(net).__name__}) cannot be split into stages: {why}; see the "
        "README for the timm families that split."
    )


def _checker(
    net: nn.Module, units: list[tuple[str, nn.Module]], head: nn.Module, model: str
) -> Callable[[Sequence[int]], None]:
    """The check that the split reproduces ``net`` in eval mode, on two seeded random images of
    the data's shape (``net``'s modes and weights are left as they were)."""

    @torch.no_grad()
    def check(input_shape: Sequence[int]) -> None:
        x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0))
        modes = [m.training for m in net.modules()]
        net.eval()
        try:
            try:
                want = net(x)
            except Exception as exc:  # noqa: BLE001  (any failure of a foreign model's forward)
                raise EENNError(
                    f"backbone.name={model!r} does not run on images of shape {list(input_shape)} "
                    f"({_first_line(exc)}); set its input size, e.g. +backbone.img_size=..."
                ) from None
            try:
                got = x
                for _, unit in units:
                    got = unit(got)
                got = head(got)
            except Exception as exc:  # noqa: BLE001
                raise _unsplittable(model, net, f"its units run one after another fail ({_first_line(exc)})") from None
        finally:
            for m, mode in zip(net.modules(), modes):
                m.training = mode
        if not isinstance(want, torch.Tensor) or got.shape != want.shape:
            raise _unsplittable(model, net, "its units give an output of another form than the model's")
        diff = float((got - want).abs().max())
        if not diff <= ATOL:
            raise _unsplittable(
                model,
                net,
                f"its units run one after another differ from the model's own forward by "
                f"{diff:.2g} (its forward does work outside its children)",
            )

    return check


@cache
def _timm_models() -> frozenset[str]:
    return frozenset(timm.list_models())


@BACKBONES.register("timm")
def timm_backbone(
    num_classes: int,
    model: str | None = None,
    in_chans: int = 3,
    pretrained: bool = False,
    checkpoint: str | None = None,
    **model_kwargs: object,
) -> BackboneParts:
    """``timm.create_model(model)`` (null: resnet18) split into units; ``checkpoint`` loads local
    weights (offline); further arguments (``img_size``, ``patch_size``...) go to timm."""
    model = model or DEFAULT_MODEL
    if model not in _timm_models():
        raise EENNError(f"backbone.model={model!r} is not a timm model (see timm.list_models()).")
    overlay = None
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise EENNError(f"backbone.checkpoint={checkpoint!r} does not exist.")
        pretrained, overlay = True, {"file": str(checkpoint)}
    try:
        net = timm.create_model(
            model,
            pretrained=pretrained,
            num_classes=num_classes,
            in_chans=in_chans,
            pretrained_cfg_overlay=overlay,
            **model_kwargs,
        )
    except (OSError, RuntimeError) as exc:
        if pretrained and checkpoint is None:
            raise EENNError(
                f"backbone.pretrained=true could not fetch {model}'s weights ({type(exc).__name__}); "
                "without network, pass a local file as backbone.checkpoint=<path>."
            ) from None
        raise
    except TypeError as exc:  # an argument this model's class does not take
        raise EENNError(f"backbone: {model} does not take these arguments ({_first_line(exc)}).") from None
    if checkpoint is not None:
        _check_loads_weights(net, checkpoint, model)
    if not getattr(net, "feature_info", None):
        raise _unsplittable(model, net, "timm gives it no feature_info to cut along")
    units, head, stage_modules, tokens = _split(net)
    names = [n for n, _ in units]
    missing = [m for m in stage_modules if m not in names]
    if missing:
        raise _unsplittable(model, net, f"its feature stages {missing} are not top-level units")
    first_stage = names.index(stage_modules[0])
    return BackboneParts(
        units=units,
        head=head,
        blocks=names[first_stage:],
        stages={m: m for m in stage_modules},
        tokens=tokens,
        check=_checker(net, units, head, model),
    )


def _checkpoint_keys(path: str) -> set[str] | None:
    """The tensor names of a safetensors or PyTorch checkpoint (a wrapped state dict unwrapped, a
    DDP ``module.`` prefix dropped); None for a format read otherwise (timm reads .npz itself)."""
    if path.endswith(".npz"):
        return None
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as fh:
                keys = set(fh.keys())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for wrapper in ("state_dict", "model", "state_dict_ema"):
                if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
                    break
            keys = set(state) if isinstance(state, dict) else set()
    except Exception:  # noqa: BLE001  (an unreadable file: timm's loading has said so already)
        return None
    return {k.removeprefix("module.") for k in keys}


def _check_loads_weights(net: nn.Module, checkpoint: str, model: str) -> None:
    """timm loads a checkpoint without its model's tensors and logs the missing keys at INFO only:
    a checkpoint that holds none of them (another model's, or a predictions file) is refused."""
    keys = _checkpoint_keys(str(checkpoint))
    if keys is not None and not keys & set(net.state_dict()):
        raise EENNError(
            f"backbone.checkpoint={str(checkpoint)!r} holds none of {model}'s weights (its tensors are "
            f"named {', '.join(sorted(keys)[:3]) or 'nothing'}...): give a checkpoint of this model."
        )


BACKBONES.add_namespace("timm", "model", lambda key: key in _timm_models(), "any timm model name")
