"""Official checkpoint layouts: which family a file is, where its teacher is, what it is made of.

One adapter per family turns the loaded object into a :class:`TeacherSpec`: the backbone and
head state dicts with the prefixes the official training code added stripped, and the
architecture and head hyper-parameters inferred from tensor shapes
(as the official repositories release them):

* DINO  ``{student, teacher, optimizer, epoch, args, dino_loss}``; ``teacher`` keys
  ``[module.]backbone.*`` / ``[module.]head.*``.
* iBOT  same with ``ibot_loss``; the head also has ``last_layer2`` (equal to ``last_layer``
  when ``shared_head``).
* MSN   ``{target_encoder (module.-prefixed ViT with the projector under fc.*), prototypes}``.
* SwAV  a bare ``module.``-prefixed state dict (or ``{'state_dict': ...}``) with
  ``projection_head.*`` and ``prototypes.weight``.

Nothing here builds a network; :mod:`robkit.teachers.teacher` does.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from robkit.utils.errors import RobkitError

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

FAMILIES = ("dino", "ibot", "msn", "swav", "dinov2", "dinov3", "robkit")


class LayoutError(RobkitError, ValueError):
    """A file is not one of the layouts robkit can read as a teacher."""


@dataclass
class TeacherSpec:
    """What a checkpoint holds, ready to build: the family, two state dicts and their shapes."""

    family: str
    layout: str  # human description: "DINO full checkpoint, entry 'teacher'"
    backbone: dict[str, Any]  # {"type": "vit" | "xcit" | "resnet", **hyper-parameters}
    head: dict[str, Any]  # {"type": "DINOHead" | "iBOTHead" | "MSNHead" | "SwAVHead", **kwargs}
    backbone_state: StateDict
    head_state: StateDict
    args: dict[str, Any] = field(default_factory=dict)  # the training arguments, when the file has them


# --------------------------------------------------------------------------------------------
# helpers


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def strip_prefix(sd: StateDict, prefix: str) -> StateDict:
    """Remove ``prefix`` when *every* key carries it (DDP's ``module.``), else return ``sd``."""
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def split_prefix(sd: StateDict, prefixes: tuple[str, ...]) -> tuple[list[StateDict], StateDict]:
    """Split ``sd`` by key prefix; returns one dict per prefix (prefix removed) and the rest."""
    parts: list[StateDict] = [{} for _ in prefixes]
    rest: StateDict = {}
    for k, v in sd.items():
        for i, p in enumerate(prefixes):
            if k.startswith(p):
                parts[i][k[len(p) :]] = v
                break
        else:
            rest[k] = v
    return parts, rest


def _namespace_dict(args: Any) -> dict[str, Any]:
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else {}


def _count(sd: StateDict, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in sd if (m := rx.match(k))}
    return max(idx) + 1 if idx else 0


# --------------------------------------------------------------------------------------------
# backbone shape inference


def backbone_type(sd: StateDict) -> str:
    """The backbone family a state dict's keys show: ``vit``, ``xcit``, ``swin`` or ``resnet``."""
    if "cls_token" in sd and any(k.startswith("cls_attn_blocks.") for k in sd):
        return "xcit"
    if "cls_token" in sd and "patch_embed.proj.weight" in sd:
        return "vit"
    if "patch_embed.proj.weight" in sd and "layers.0.blocks.0.attn.relative_position_bias_table" in sd:
        return "swin"
    if "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        return "resnet"
    sample = ", ".join(sorted(sd)[:6])
    raise LayoutError(
        "cannot tell the backbone architecture from its keys (expected a ViT with cls_token/"
        f"patch_embed.proj/blocks.*, an XCiT with cls_attn_blocks.*, a Swin with layers.*.blocks.*, or a ResNet with conv1/layer1..4); "
        f"first keys: {sample}"
    )


def default_num_heads(embed_dim: int) -> int:
    """ViT heads are not visible in the weights; every official ViT uses 64-wide heads."""
    return embed_dim // 64 if embed_dim % 64 == 0 else 1


def infer_backbone(sd: StateDict) -> dict[str, Any]:
    """Architecture hyper-parameters of a backbone state dict (prefixes already stripped)."""
    kind = backbone_type(sd)
    if kind == "vit":
        w = sd["patch_embed.proj.weight"]  # [D, 3, p, p]
        dim, patch = int(w.shape[0]), int(w.shape[-1])
        n_pos = int(sd["pos_embed"].shape[1]) - 1 if "pos_embed" in sd else 196
        grid = round(n_pos**0.5)
        return {
            "type": "vit",
            "embed_dim": dim,
            "depth": _count(sd, r"blocks\.(\d+)\."),
            "num_heads": default_num_heads(dim),
            "patch_size": patch,
            "mlp_ratio": float(sd["blocks.0.mlp.fc1.weight"].shape[0]) / dim,
            "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
            "img_size": grid * patch,
            "init_values": 1e-5 if "blocks.0.ls1.gamma" in sd else None,
        }
    if kind == "swin":
        # Official Swin layout (iBOT): PatchMerging at the *end* of a stage, attn_mask buffers kept.
        n_stages = _count(sd, r"layers\.(\d+)\.")
        depths = [_count(sd, rf"layers\.{s}\.blocks\.(\d+)\.") for s in range(n_stages)]
        tables = [sd[f"layers.{s}.blocks.0.attn.relative_position_bias_table"] for s in range(n_stages)]
        window = (round(tables[0].shape[0] ** 0.5) + 1) // 2
        w = sd["patch_embed.proj.weight"]
        mask = sd.get("layers.0.blocks.1.attn_mask")  # [windows, w*w, w*w] at the training resolution
        grid = window * round(mask.shape[0] ** 0.5) if mask is not None else 224 // int(w.shape[-1])
        return {
            "type": "swin",
            "embed_dim": int(w.shape[0]),
            "depths": depths,
            "num_heads": [int(t.shape[1]) for t in tables],
            "window_size": window,
            "patch_size": int(w.shape[-1]),
            "mlp_ratio": float(sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0]) / int(w.shape[0]),
            "img_size": grid * int(w.shape[-1]),
        }
    if kind == "xcit":
        dim = int(sd["cls_token"].shape[-1])
        n_convs = len({k.split(".")[2] for k in sd if re.match(r"patch_embed\.proj\.\d+\.0\.weight", k)})
        return {
            "type": "xcit",
            "embed_dim": dim,
            "depth": _count(sd, r"blocks\.(\d+)\."),
            "num_heads": int(sd["blocks.0.attn.temperature"].shape[0]),
            "patch_size": 2**n_convs,
            "mlp_ratio": float(sd["blocks.0.mlp.fc1.weight"].shape[0]) / dim,
            "cls_attn_layers": _count(sd, r"cls_attn_blocks\.(\d+)\."),
            "tokens_norm": True,  # every official XCiT (and DINO's) uses it; not visible in weights
        }
    n_stages = _count(sd, r"layer(\d+)\.") - 1  # layer1..layerS -> max index S
    layers, widths, expansions = [], [], set()
    for s in range(1, n_stages + 1):
        if f"layer{s}.0.conv3.weight" not in sd:
            raise LayoutError(
                f"ResNet stage layer{s} has no conv3: only bottleneck ResNets (ResNet-50 family) are teachers"
            )
        layers.append(_count(sd, rf"layer{s}\.(\d+)\."))
        widths.append(int(sd[f"layer{s}.0.conv1.weight"].shape[0]))
        expansions.add(int(sd[f"layer{s}.0.conv3.weight"].shape[0]) // widths[-1])
    if len(expansions) != 1:
        raise LayoutError(f"ResNet stages have different bottleneck expansions {sorted(expansions)}")
    return {
        "type": "resnet",
        "layers": layers,
        "stem_width": int(sd["conv1.weight"].shape[0]),
        "stage_widths": widths,
        "expansion": expansions.pop(),
    }


def backbone_dim(arch: dict[str, Any]) -> int:
    """Width of the backbone's output embedding for an inferred ``arch`` record."""
    if arch["type"] == "resnet":
        return int(arch["stage_widths"][-1]) * int(arch.get("expansion", 4))
    if arch["type"] == "swin":
        return int(arch["embed_dim"]) * 2 ** (len(arch["depths"]) - 1)
    return int(arch["embed_dim"])


# --------------------------------------------------------------------------------------------
# head shape inference


def _fold_parametrized_weight_norm(sd: StateDict) -> StateDict:
    """``parametrizations.weight.original{0,1}`` (new torch weight_norm) → ``weight_g``/``weight_v``."""
    out = {}
    for k, v in sd.items():
        k = k.replace("parametrizations.weight.original0", "weight_g")
        out[k.replace("parametrizations.weight.original1", "weight_v")] = v
    return out


def infer_dino_head(sd: StateDict) -> dict[str, Any]:
    """DINO / iBOT head: ``mlp.*`` Linear(+BN) stack, ``last_layer`` (weight-normed or plain)."""
    if "mlp.weight" in sd:  # nlayers=1: mlp is a bare Linear
        linears, use_bn = [sd["mlp.weight"]], False
    else:
        idx = sorted({int(k.split(".")[1]) for k in sd if k.startswith("mlp.")})
        linears = [sd[f"mlp.{i}.weight"] for i in idx if sd[f"mlp.{i}.weight"].dim() == 2]
        use_bn = any(f"mlp.{i}.running_mean" in sd for i in idx)
    if not linears:
        raise LayoutError("the head has no mlp.* layers: not a DINO/iBOT head")
    if "last_layer.weight_v" in sd:
        out_dim, weight_norm = int(sd["last_layer.weight_v"].shape[0]), True
    elif "last_layer.weight" in sd:
        out_dim, weight_norm = int(sd["last_layer.weight"].shape[0]), False
    else:
        raise LayoutError("the head has no last_layer.weight_v / last_layer.weight")
    spec: dict[str, Any] = {
        "type": "DINOHead",
        "in_dim": int(linears[0].shape[1]),
        "out_dim": out_dim,
        "hidden_dim": int(linears[0].shape[0]) if len(linears) > 1 else 2048,
        "bottleneck_dim": int(linears[-1].shape[0]),
        "nlayers": len(linears),
        "use_bn": use_bn,
        "weight_norm": weight_norm,
    }
    if weight_norm:
        g = sd.get("last_layer.weight_g")
        spec["norm_last_layer"] = bool(g is not None and torch.all(g == 1).item())
    if "last_layer2.weight_v" in sd:
        spec["type"] = "iBOTHead"
        shared = all(
            k2 in sd and sd[k2].shape == sd[k].shape and torch.equal(sd[k2], sd[k])
            for k in ("last_layer.weight_g", "last_layer.weight_v")
            for k2 in [k.replace("last_layer", "last_layer2")]
        )
        spec["shared_head"] = shared
        spec["patch_out_dim"] = int(sd["last_layer2.weight_v"].shape[0])
        spec.pop("norm_last_layer", None)
    return spec


def infer_msn_head(sd: StateDict) -> dict[str, Any]:
    """MSN head: the ``fc.fc1..fc3`` projector (BatchNorm if ``fc.bn1`` is there) and ``prototypes``."""
    return {
        "type": "MSNHead",
        "in_dim": int(sd["fc.fc1.weight"].shape[1]),
        "hidden_dim": int(sd["fc.fc1.weight"].shape[0]),
        "out_dim": int(sd["fc.fc3.weight"].shape[0]),
        "n_prototypes": int(sd["prototypes"].shape[0]),
        "use_bn": "fc.bn1.weight" in sd,
    }


def infer_swav_head(sd: StateDict) -> dict[str, Any]:
    """SwAV head: the ``projection_head.{0,1,3}`` MLP and ``prototypes``; multi-prototype files are refused."""
    if any(k.startswith("prototypes.prototypes") for k in sd):
        raise LayoutError(
            "this file has several prototype heads (prototypes.prototypes0/1/2): a DeepCluster-v2 or "
            "SeLa-v2 model, not SwAV; only single-prototype SwAV files are teachers"
        )
    if "projection_head.weight" in sd:
        raise LayoutError("SwAV files with a linear projection head (hidden_mlp=0) are not supported")
    return {
        "type": "SwAVHead",
        "in_dim": int(sd["projection_head.0.weight"].shape[1]),
        "hidden_dim": int(sd["projection_head.0.weight"].shape[0]),
        "out_dim": int(sd["projection_head.3.weight"].shape[0]),
        "n_prototypes": int(sd["prototypes.weight"].shape[0]),
        "use_bn": "projection_head.1.weight" in sd,
    }


# --------------------------------------------------------------------------------------------
# family adapters


def _no_head_error(what: str) -> LayoutError:
    return LayoutError(
        f"{what} holds a backbone but no projection head / prototypes, so it cannot give RoB its "
        "targets. DINO and iBOT publish the head only in their full checkpoints "
        "(DINO: *_full_checkpoint.pth, iBOT: <arch>/checkpoint.pth); use those."
    )


def _from_multicrop(obj: dict, family: str, key: str, args: dict) -> TeacherSpec:
    """DINO / iBOT: ``MultiCropWrapper`` state dict ``[module.]backbone.*`` + ``[module.]head.*``."""
    if key not in obj:
        raise LayoutError(f"{family.upper()} checkpoint has no entry {key!r}; entries: {sorted(obj)}")
    sd = strip_prefix(dict(obj[key]), "module.")
    (bb, head), rest = split_prefix(sd, ("backbone.", "head."))
    if rest:
        raise LayoutError(
            f"unexpected keys in {family.upper()} entry {key!r} (expected backbone.* and head.*): {sorted(rest)[:8]}"
        )
    if not head:
        raise _no_head_error(f"the {family.upper()} entry {key!r}")
    bb.pop("masked_embed", None)  # iBOT student's mask token: training only
    head = _fold_parametrized_weight_norm(head)
    hspec = infer_dino_head(head)
    if family == "ibot" and hspec["type"] != "iBOTHead":  # iBOT run saved without last_layer2
        hspec["type"] = "iBOTHead"
        hspec.update(shared_head=True, patch_out_dim=hspec["out_dim"])
        hspec.pop("norm_last_layer", None)
    return TeacherSpec(
        family,
        f"{family.upper()} full checkpoint, entry {key!r}",
        infer_backbone(bb),
        hspec,
        bb,
        head,
        args,
    )


def _from_msn(obj: dict, key: str) -> TeacherSpec:
    key = key or "target_encoder"
    if key not in obj:
        raise LayoutError(f"MSN checkpoint has no entry {key!r}; entries: {sorted(obj)}")
    if "prototypes" not in obj:
        raise LayoutError("MSN checkpoint has no 'prototypes' tensor, so it has no head to distil")
    sd = strip_prefix(dict(obj[key]), "module.")
    (fc,), bb = split_prefix(sd, ("fc.",))
    if not fc:
        raise _no_head_error(f"MSN entry {key!r} (no fc.* projector)")
    protos = obj["prototypes"]
    if isinstance(protos, dict):  # a saved nn.Parameter holder, just in case
        protos = next(iter(protos.values()))
    head = {f"fc.{k}": v for k, v in fc.items()} | {"prototypes": protos}
    return TeacherSpec(
        "msn",
        f"MSN checkpoint, entry {key!r} + prototypes",
        infer_backbone(bb),
        infer_msn_head(head),
        bb,
        head,
    )


def _from_swav(sd: StateDict, wrapped: bool) -> TeacherSpec:
    sd = strip_prefix(sd, "module.")
    head = {k: v for k, v in sd.items() if k.startswith(("projection_head.", "prototypes."))}
    bb = {k: v for k, v in sd.items() if k not in head}
    if not any(k.startswith("prototypes.") for k in head):
        raise LayoutError(
            "this ResNet state dict has no prototypes.weight: a backbone-only file. SwAV teachers need "
            "the *_pretrain.pth.tar files, which hold projection_head.* and prototypes.weight"
        )
    where = "{'state_dict': ...}" if wrapped else "bare state dict"
    return TeacherSpec("swav", f"SwAV {where}", infer_backbone(bb), infer_swav_head(head), bb, head)


def detect_family(obj: Any) -> str:
    """``'dino' | 'ibot' | 'msn' | 'swav' | 'dinov2' | 'dinov3' | 'robkit'`` from the contents of a loaded checkpoint."""
    from robkit.models.checkpoint import is_robkit_checkpoint

    if is_robkit_checkpoint(obj):
        return "robkit"
    if not isinstance(obj, dict):
        raise LayoutError(f"a teacher checkpoint is a dict; this file holds a {type(obj).__name__}")
    if "ibot_loss" in obj:
        return "ibot"
    if "dino_loss" in obj:
        return "dino"
    if "target_encoder" in obj:
        return "msn"
    if "teacher" in obj and isinstance(obj["teacher"], dict):
        head2 = any("head.last_layer2." in k for k in obj["teacher"])
        return "ibot" if head2 else "dino"
    sd = obj.get("state_dict", obj)
    if _is_state_dict(sd):
        from robkit.teachers.dinov2 import is_dinov2_state

        if is_dinov2_state(sd):  # a headless DINOv2 backbone (robkit.teachers.dinov2)
            return "dinov2"
        from robkit.teachers.dinov3 import is_dinov3_state

        if is_dinov3_state(sd):  # a headless DINOv3 ViT or ConvNeXt (robkit.teachers.dinov3)
            return "dinov3"
        keys = {k.removeprefix("module.") for k in sd}
        if any(k.startswith("prototypes.") for k in keys) or any(
            k.startswith("projection_head.") for k in keys
        ):
            return "swav"
        if any(k.startswith("head.last_layer2.") for k in keys):
            return "ibot"
        if any(k.startswith("head.") for k in keys) and any(k.startswith("backbone.") for k in keys):
            return "dino"
        if "fc.fc1.weight" in keys:
            raise LayoutError(
                "an MSN encoder without its prototypes; MSN files hold {target_encoder, prototypes}"
            )
        try:
            backbone_type({k.removeprefix("module."): v for k, v in sd.items()})
        except LayoutError:
            pass
        else:
            raise _no_head_error("this file")
    entries = sorted(obj) if isinstance(obj, dict) else []
    raise LayoutError(
        "not a teacher checkpoint layout robkit knows: expected a DINO/iBOT full checkpoint "
        "({student, teacher, ..., dino_loss|ibot_loss}), an MSN file ({target_encoder, prototypes}), "
        f"a SwAV state dict (projection_head.*, prototypes.weight) or a robkit checkpoint; got entries {entries[:10]}"
    )


def parse_checkpoint(obj: Any, checkpoint_key: str | None = None) -> TeacherSpec:
    """Detect the layout of an official checkpoint and return its :class:`TeacherSpec`."""
    family = detect_family(obj)
    if family == "robkit":
        raise LayoutError("robkit checkpoints are read by robkit.models.checkpoint.load_student")
    if family == "dinov2":
        raise LayoutError("DINOv2 backbones have no head; robkit.teachers.dinov2 builds them")
    if family == "dinov3":
        raise LayoutError("DINOv3 backbones have no head; robkit.teachers.dinov3 builds them")
    if family in ("dino", "ibot"):
        entry = obj if "teacher" in obj else {"teacher": obj.get("state_dict", obj)}
        return _from_multicrop(entry, family, checkpoint_key or "teacher", _namespace_dict(obj.get("args")))
    if family == "msn":
        return _from_msn(obj, checkpoint_key or "target_encoder")
    wrapped = "state_dict" in obj and isinstance(obj["state_dict"], dict)
    return _from_swav(dict(obj["state_dict"] if wrapped else obj), wrapped)
