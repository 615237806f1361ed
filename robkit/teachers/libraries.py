"""Any timm or torchvision backbone, loaded from a local file, as a headless teacher.

Spelling: ``timm:ARCH`` or ``torchvision:ARCH`` with the weights file given separately
(``robkit distill --teacher timm:resnet50 --teacher-file resnet50.safetensors``); ``timm`` or
``torchvision`` alone infers the architecture where the file allows it:

* a timm training checkpoint (``train.py``'s ``{"arch": ..., "state_dict": ...}``): its ``arch``;
* a Hugging Face hub snapshot (``model.safetensors`` or ``pytorch_model.bin`` beside a
  ``config.json``): the config's ``architecture``;
* a torchvision release file (``resnet50-0676ba61.pth``): the name before the hash.

The network is built without its classifier (timm ``num_classes=0``; torchvision's classifier is not
run), the file is loaded strictly (a classifier in the file is dropped and said so), and the teacher
gives what :class:`~robkit.teachers.backbone.BackboneTeacher` needs: the pooled (or CLS) embedding
and the last spatial map as patch tokens. Files are read without running code from them
(``weights_only`` pickles or safetensors).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robkit.teachers.backbone import BackboneTeacher
from robkit.utils.constants import IMAGENET_MEAN, IMAGENET_STD
from robkit.utils.errors import RobkitError

Tensor = torch.Tensor
LIBRARIES = ("timm", "torchvision")
_TV_RELEASE = re.compile(r"^(?P<arch>[a-z0-9_]+?)-[0-9a-f]{6,}$")  # resnet50-0676ba61(.pth)


class LibraryTeacherError(RobkitError, ValueError):
    """A ``timm:``/``torchvision:`` teacher that cannot be built or does not fit its file."""


def parse_spec(spec: str) -> tuple[str, str | None] | None:
    """``("timm", "resnet50")`` for ``timm:resnet50``, ``("timm", None)`` for ``timm``; ``None`` when
    ``spec`` names no library (a catalog name or a path).
    """
    lib, _, arch = spec.partition(":")
    if lib not in LIBRARIES:
        return None
    return lib, (arch or None)


def _state_dict_of(obj: Any) -> tuple[dict[str, Tensor], str | None]:
    """The weights of a loaded file and the architecture it names, if any."""
    if not isinstance(obj, dict):
        raise LibraryTeacherError(f"expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise LibraryTeacherError("the file holds no tensors (expected a state dict)")
    return sd, arch


def infer_arch(library: str, path: Path, file_arch: str | None) -> str | None:
    """The architecture a file names (see the module docstring), or ``None``."""
    if file_arch:
        return file_arch
    config = path.parent / "config.json"
    if library == "timm" and config.is_file():
        try:
            cfg = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        arch = cfg.get("architecture") or cfg.get("model_name")
        return arch if isinstance(arch, str) else None
    if library == "torchvision":
        m = _TV_RELEASE.match(path.name.split(".")[0])
        if m:
            return m.group("arch")
    return None


# ---------------------------------------------------------------------------------------------
# timm


class TimmFeatures(nn.Module):
    """A timm model without its classifier: ``forward_features`` gives the pooled (or CLS) embedding
    (``forward_head(pre_logits=True)``: the model's own pooling and norm) and the final tokens or map.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        m: Any = model
        self.embed_dim = int(getattr(m, "head_hidden_size", None) or m.num_features)  # forward_head width
        self.num_prefix_tokens = int(getattr(m, "num_prefix_tokens", 0) or 0)
        pe = getattr(m, "patch_embed", None)
        patch = getattr(pe, "patch_size", None)
        self.patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch) if patch else None
        if self.patch_size is None and getattr(m, "feature_info", None):
            self.patch_size = int(m.feature_info[-1]["reduction"])
        self.nhwc = getattr(m, "output_fmt", "NCHW") == "NHWC"

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """``x_norm_clstoken`` ``[B, D]`` and ``x_norm_patchtokens`` ``[B, N, D]``."""
        m: Any = self.model
        f = m.forward_features(x)
        pooled = m.forward_head(f, pre_logits=True)
        if f.dim() == 4:  # a CNN's (or hierarchical ViT's) last map
            patches = f.flatten(1, 2) if self.nhwc else f.flatten(2).transpose(1, 2)
        elif f.dim() == 3:  # tokens: prefix (CLS, registers) then patches
            patches = f[:, self.num_prefix_tokens :]
        else:
            raise LibraryTeacherError(
                f"timm forward_features gave a {f.dim()}-d tensor; expected a map or tokens"
            )
        return {"x_norm_clstoken": pooled, "x_norm_patchtokens": patches}

    def forward(self, x: Tensor) -> Tensor:
        """The pooled embedding."""
        return self.forward_features(x)["x_norm_clstoken"]


def _build_timm(arch: str, sd: dict[str, Tensor]) -> tuple[nn.Module, dict[str, Any]]:
    import timm

    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:6]}*")[:8]
        raise LibraryTeacherError(
            f"timm has no architecture {arch!r}; close names: {', '.join(close) or 'none'} "
            "(`python -c 'import timm; print(timm.list_models(\"*vit*\"))'` lists them)"
        )
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0}
    pos, proj = sd.get("pos_embed"), sd.get("patch_embed.proj.weight")
    if pos is not None and pos.dim() == 3 and proj is not None and proj.dim() == 4:
        # a ViT: the file's position table fixes the training size (with or without a CLS slot);
        # dynamic_img_size resizes it for any other multiple of the patch, as timm does
        n = int(pos.shape[1])
        side = math.isqrt(n) if math.isqrt(n) ** 2 == n else math.isqrt(n - 1)
        kwargs.update(img_size=side * int(proj.shape[-1]), dynamic_img_size=True)
    try:
        model = timm.create_model(arch, **kwargs)
    except TypeError:  # an architecture without these keywords
        kwargs.pop("dynamic_img_size", None)
        kwargs.pop("img_size", None)
        model = timm.create_model(arch, **kwargs)
    cfg = timm.data.resolve_data_config({}, model=model)
    return model, {"mean": cfg["mean"], "std": cfg["std"], "resolution": int(cfg["input_size"][-1])}


# ---------------------------------------------------------------------------------------------
# torchvision


class TorchvisionFeatures(nn.Module):
    """A torchvision classification model run up to its global pooling: the ResNet family
    (``layer4``), RegNets (``trunk_output``), models with a ``features`` trunk (MobileNet, EfficientNet,
    ConvNeXt, DenseNet, VGG...) and ViTs (``encoder``; CLS and patch tokens after the final norm).
    """

    def __init__(self, model: nn.Module, arch: str) -> None:
        super().__init__()
        self.model, self.arch = model, arch
        m: Any = model
        if hasattr(m, "class_token") and hasattr(m, "encoder"):
            self.kind, self.embed_dim, self.patch_size = "vit", int(m.hidden_dim), int(m.patch_size)
        elif hasattr(m, "layer4"):
            self.kind, self.patch_size = "resnet", 32
        elif hasattr(m, "trunk_output"):
            self.kind, self.patch_size = "regnet", 32
        elif isinstance(getattr(m, "features", None), nn.Module):
            self.kind, self.patch_size = "features", 32
        else:
            raise LibraryTeacherError(
                f"torchvision {arch!r}: robkit runs the ResNet, RegNet, ViT and 'features'-trunk families "
                "(MobileNet, EfficientNet, ConvNeXt, DenseNet, VGG); load this one through timm instead "
                "(--teacher timm:ARCH)"
            )
        if self.kind != "vit":
            classifier = next(
                (
                    getattr(m, n)
                    for n in ("fc", "classifier", "heads")
                    if isinstance(getattr(m, n, None), nn.Module)
                ),
                None,
            )
            linear = (
                next((c for c in classifier.modules() if isinstance(c, nn.Linear)), None)
                if classifier
                else None
            )
            if linear is None:
                raise LibraryTeacherError(
                    f"torchvision {arch!r}: no classifier Linear to read the feature width from"
                )
            self.embed_dim = int(linear.in_features)

    def _map(self, x: Tensor) -> Tensor:
        m: Any = self.model
        if self.kind == "resnet":
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            return m.layer4(m.layer3(m.layer2(m.layer1(x))))
        if self.kind == "regnet":
            return m.trunk_output(m.stem(x))
        f = m.features(x)
        return torch.relu(f) if type(m).__name__ == "DenseNet" else f  # DenseNet's forward applies it

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """``x_norm_clstoken`` ``[B, D]`` (the global average, or the ViT's CLS) and patch tokens."""
        m: Any = self.model
        if self.kind == "vit":
            t = m._process_input(x)
            t = m.encoder(torch.cat([m.class_token.expand(t.shape[0], -1, -1), t], dim=1))
            return {"x_norm_clstoken": t[:, 0], "x_norm_patchtokens": t[:, 1:]}
        f = self._map(x)
        return {"x_norm_clstoken": f.mean(dim=(2, 3)), "x_norm_patchtokens": f.flatten(2).transpose(1, 2)}

    def forward(self, x: Tensor) -> Tensor:
        """The pooled embedding."""
        return self.forward_features(x)["x_norm_clstoken"]


def _build_torchvision(arch: str) -> tuple[nn.Module, dict[str, Any]]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        close = [n for n in names if n.startswith(arch[:4])][:8]
        raise LibraryTeacherError(
            f"torchvision has no classification model {arch!r}; close names: {', '.join(close) or 'none'}"
        )
    model = torchvision.models.get_model(arch, weights=None)
    size = int(getattr(model, "image_size", 224))
    return model, {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resolution": size}


# ---------------------------------------------------------------------------------------------


def _classifier_keys(library: str, model: nn.Module, sd: dict[str, Tensor]) -> list[str]:
    """Keys of the file's classifier, which the headless teacher does not use."""
    if library == "timm":
        name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
        prefixes = [name] if isinstance(name, str) else list(name)
    else:
        prefixes = ["fc", "classifier", "heads"]
    own = set(model.state_dict())
    return [k for k in sd if k not in own and any(k == p or k.startswith(p + ".") for p in prefixes)]


def library_teacher(
    spec: str, path: str | os.PathLike, obj: Any, sha256: str | None = None
) -> BackboneTeacher:
    """A frozen headless teacher from ``timm:ARCH`` / ``torchvision:ARCH`` and the loaded file ``obj``."""
    from robkit.teachers.teacher import load_exact

    parsed = parse_spec(spec)
    if parsed is None:
        raise LibraryTeacherError(f"{spec!r} is not timm:ARCH or torchvision:ARCH")
    library, arch = parsed
    path = Path(path)
    sd, file_arch = _state_dict_of(obj)
    arch = arch or infer_arch(library, path, file_arch)
    if not arch:
        raise LibraryTeacherError(
            f"{path.name} does not say which {library} architecture it holds (no 'arch' key, no config.json "
            f"beside it{', no release-style file name' if library == 'torchvision' else ''}): "
            f"name it, e.g. --teacher {library}:resnet50"
        )
    if file_arch and parse_spec(spec) != (library, None) and file_arch.split(".")[0] != arch.split(".")[0]:
        raise LibraryTeacherError(
            f"--teacher names {library}:{arch}, but {path.name} says it holds {file_arch!r}"
        )
    if library == "timm":
        net, meta = _build_timm(arch, sd)
    else:
        net, meta = _build_torchvision(arch)
    dropped = _classifier_keys(library, net, sd)
    sd = {k: v for k, v in sd.items() if k not in dropped}
    if library == "torchvision":  # the classifier stays in the module (unused); keep strictness for the rest
        own = net.state_dict()
        sd = {
            **{
                k: v
                for k, v in own.items()
                if k not in sd and k.split(".")[0] in ("fc", "classifier", "heads")
            },
            **sd,
        }
    load_exact(net, sd, f"{library}:{arch}")
    wrapper: nn.Module = TimmFeatures(net) if library == "timm" else TorchvisionFeatures(net, arch)
    return BackboneTeacher(
        wrapper,
        name=f"{library}:{arch}",
        family=library,
        arch={"type": library, "name": arch, "classifier_dropped": len(dropped)},
        resolution=meta["resolution"],
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        sha256=sha256,
        source=str(path),
    )
