"""Evaluation classifiers (the original's ``train_classifier.py``) in Flax linen: a small CNN and ResNet-18/34.

Every classifier takes images ``x: [B, H, W, C]`` in data space ``[-1, 1]`` (the original's
``ToTensor`` + ``Normalize(0.5, 0.5)``) and returns logits ``[B, n_classes]``. BatchNorm statistics live in
the ``batch_stats`` collection; ``train=True`` updates them (``mutable=['batch_stats']``), ``train=False``
uses the running averages.

Architectures (``ClassifierConfig.arch``):
  * ``cnn`` — for 8x8 / 28x28 / 32x32 digits and MNIST-like images: stages of two 3x3 conv + BatchNorm + ReLU
    (widths ``width``, ``2*width``[, ``4*width``]; 2 stages up to 16 px, 3 above) with 2x2 max-pooling between
    stages, global average pooling and one dense layer.
  * ``resnet18`` / ``resnet34`` — torchvision's BasicBlock ResNets. ``stem='cifar'`` (3x3 stride-1 conv, no
    max-pool; for 32x32/64x64 training from scratch) or ``stem='imagenet'`` (7x7 stride-2 conv + 3x3 max-pool:
    torchvision's layout, so :func:`import_torchvision_resnet` loads a torchvision ``resnet34`` state dict).
    The original classifier is an ImageNet-pretrained ResNet-34 fine-tuned at 224 px on [-1, 1] inputs:
    ``ClassifierConfig(arch='resnet34', stem='imagenet', input_size=224)`` reproduces it (bilinear resize to
    224 inside the model, as its ``Resize((224, 224))``).

Module names follow torchvision's state-dict names (``layer1.0.conv1.weight`` ->
``params['layer1_0']['conv1']['kernel']``), so the import is a rename plus layout transposes.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

ARCHS = ("cnn", "resnet18", "resnet34")
STEMS = ("cifar", "imagenet")
NORMALIZATIONS = ("none", "imagenet")
RESNET_BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Everything needed to rebuild a classifier; stored as JSON beside its weights.

    image_size/channels: the images the classifier was trained on (samples must match).
    input_size: resize inputs to this square size inside the model (None: no resize; 224: the original's).
    normalization: 'none' feeds [-1, 1] as is (ours and the original's); 'imagenet' maps [-1, 1] to
      [0, 1] then applies torchvision's ImageNet mean/std (for imported classifiers trained that way).
    """
    arch: str = "cnn"
    n_classes: int = 10
    image_size: int = 32
    channels: int = 3
    width: int = 32
    stem: str = "cifar"
    input_size: int | None = None
    normalization: str = "none"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown classifier arch {self.arch!r}; expected one of {', '.join(ARCHS)}")
        if self.stem not in STEMS:
            raise ValueError(f"unknown ResNet stem {self.stem!r}; expected one of {', '.join(STEMS)}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; expected none or imagenet")
        if self.n_classes < 2:
            raise ValueError(f"a classifier needs n_classes >= 2, got {self.n_classes}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ClassifierConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"unknown classifier config key {unknown[0]!r}")
        return cls(**{k: (None if v is None else v) for k, v in d.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _preprocess(x: Array, cfg: ClassifierConfig) -> Array:
    x = x.astype(jnp.float32)
    if cfg.input_size is not None and x.shape[1:3] != (cfg.input_size, cfg.input_size):
        x = jax.image.resize(x, (x.shape[0], cfg.input_size, cfg.input_size, x.shape[3]), "bilinear")
    if cfg.normalization == "imagenet":
        mean = jnp.asarray(_IMAGENET_MEAN[: x.shape[-1]], jnp.float32)
        std = jnp.asarray(_IMAGENET_STD[: x.shape[-1]], jnp.float32)
        x = ((x + 1.0) / 2.0 - mean) / std
    return x


def _bn(train: bool, name: str) -> nn.BatchNorm:
    # torch BatchNorm2d: eps 1e-5, momentum 0.1 (flax's momentum is the keep rate).
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def _conv(features: int, kernel: int, stride: int, pad: int, name: str) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, kernel_init=nn.initializers.kaiming_normal(), name=name)


class SmallCNN(nn.Module):
    """Conv stages for small images; see the module docstring."""
    config: ClassifierConfig

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cfg = self.config
        x = _preprocess(x, cfg)
        n_stages = 2 if max(x.shape[1:3]) <= 16 else 3
        for s in range(n_stages):
            if s:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            for j in range(2):
                x = _conv(cfg.width * 2 ** s, 3, 1, 1, f"stage{s}_conv{j}")(x)
                x = nn.relu(_bn(train, f"stage{s}_bn{j}")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(cfg.n_classes, name="fc")(x)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3-bn-relu-conv3x3-bn (+ 1x1 conv/bn shortcut when shapes change)."""
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: Array, train: bool) -> Array:
        y = nn.relu(_bn(train, "bn1")(_conv(self.features, 3, self.stride, 1, "conv1")(x)))
        y = _bn(train, "bn2")(_conv(self.features, 3, 1, 1, "conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = _bn(train, "downsample_1")(_conv(self.features, 1, self.stride, 0, "downsample_0")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-18/34 with torchvision's names; ``stem`` picks the CIFAR or the ImageNet first layers."""
    config: ClassifierConfig

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        cfg = self.config
        x = _preprocess(x, cfg)
        if cfg.stem == "imagenet":
            x = nn.relu(_bn(train, "bn1")(_conv(64, 7, 2, 3, "conv1")(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = nn.relu(_bn(train, "bn1")(_conv(64, 3, 1, 1, "conv1")(x)))
        for i, n_blocks in enumerate(RESNET_BLOCKS[cfg.arch]):
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                x = BasicBlock(64 * 2 ** i, stride, name=f"layer{i + 1}_{j}")(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(cfg.n_classes, kernel_init=nn.initializers.xavier_uniform(), name="fc")(x)


def build_classifier(config: ClassifierConfig) -> nn.Module:
    return SmallCNN(config) if config.arch == "cnn" else ResNet(config)


def init_variables(config: ClassifierConfig, rng: Array) -> dict:
    """``{'params': ..., 'batch_stats': ...}`` for a fresh classifier."""
    model = build_classifier(config)
    x = jnp.zeros((1, config.image_size, config.image_size, config.channels), jnp.float32)
    return dict(model.init(rng, x, train=False))


def abstract_variables(config: ClassifierConfig) -> dict:
    """ShapeDtypeStructs of :func:`init_variables` (no allocation)."""
    return jax.eval_shape(lambda: init_variables(config, jax.random.key(0)))


# ------------------------------------------------------------------------------------------------------------
# torchvision ResNet import.
def _torch_name_to_path(key: str) -> tuple[str, tuple[str, ...]] | None:
    """'layer1.0.downsample.1.running_var' -> ('batch_stats', ('layer1_0', 'downsample_1', 'var'))."""
    parts = key.split(".")
    leaf = parts[-1]
    if leaf == "num_batches_tracked":
        return None
    mods = parts[:-1]
    if mods and mods[0].startswith("layer"):
        mods = [f"{mods[0]}_{mods[1]}"] + (["_".join(mods[2:])] if mods[2:] else [])
    is_bn = mods[-1].startswith("bn") or mods[-1] == "downsample_1"
    if leaf in ("running_mean", "running_var"):
        return "batch_stats", tuple(mods) + ({"running_mean": "mean", "running_var": "var"}[leaf],)
    if leaf == "weight":
        name = "scale" if is_bn else "kernel"
    elif leaf == "bias":
        name = "bias"
    else:
        raise ValueError(f"unexpected tensor {key!r} in a torchvision ResNet state dict")
    return "params", tuple(mods) + (name,)


def torchvision_resnet_arch(state_dict: Mapping[str, np.ndarray]) -> str:
    """'resnet18' or 'resnet34' from the block counts of a torchvision state dict."""
    counts = []
    for i in range(1, 5):
        idx = {int(k.split(".")[1]) for k in state_dict if k.startswith(f"layer{i}.")}
        counts.append(max(idx) + 1 if idx else 0)
    for arch, blocks in RESNET_BLOCKS.items():
        if tuple(counts) == blocks:
            return arch
    if any(k.startswith("layer1.0.conv3") for k in state_dict):
        raise ValueError("this is a Bottleneck ResNet (resnet50 or larger); only resnet18/34 are supported")
    raise ValueError(f"not a torchvision resnet18/34 state dict (blocks per layer {tuple(counts)})")


def import_torchvision_resnet(state_dict: Mapping[str, np.ndarray], config: ClassifierConfig) -> dict:
    """Map every tensor of a torchvision ResNet-18/34 state dict onto our variables for ``config``.

    ``config`` must use ``stem='imagenet'`` and ``arch``/``n_classes`` matching the file. Raises ValueError
    naming the first tensor that does not fit (missing, extra or of the wrong shape).
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: np.asarray(v) for k, v in state_dict.items()}
    target = abstract_variables(config)
    out: dict = {"params": {}, "batch_stats": {}}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for key, value in sd.items():
        path = _torch_name_to_path(key)
        if path is None:
            continue
        coll, names = path
        node = target.get(coll, {})
        for n in names:
            if not isinstance(node, Mapping) or n not in node:
                raise ValueError(f"tensor {key!r} has no place in a {config.arch} ({config.stem} stem) classifier")
            node = node[n]
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)       # OIHW -> HWIO
        elif value.ndim == 2:
            value = value.T                           # [out, in] -> [in, out]
        if tuple(value.shape) != tuple(node.shape):
            raise ValueError(f"tensor {key!r} has shape {value.shape} after transposing, expected {node.shape}")
        d = out[coll]
        for n in names[:-1]:
            d = d.setdefault(n, {})
        d[names[-1]] = value.astype(np.float32)
        seen.add((coll, names))
    for coll, tree in target.items():
        for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(p.key for p in kp)
            if (coll, names) not in seen:
                raise ValueError(f"the state dict has no tensor for {coll}/{'/'.join(names)}")
    return out


def count_params(variables) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(variables.get("params", variables))))


def classifier_for_images(arch: str, n_classes: int, image_shape: Sequence[int], **kw) -> ClassifierConfig:
    """A config for images of ``image_shape`` = (H, W, C); ResNets get the CIFAR stem unless told otherwise."""
    h, w, c = image_shape
    if h != w:
        raise ValueError(f"classifiers take square images, got {h}x{w}")
    return ClassifierConfig(arch=arch, n_classes=int(n_classes), image_size=int(h), channels=int(c), **kw)
