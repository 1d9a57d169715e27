"""Images for the vision models, all offline: Fashion-MNIST, the bundled photographs, Gaussian noise."""
import pytest
import torch

from boa.core.errors import BoaError
from boa.vision import build_vision_model
from boa.vision.images import fashion_mnist, gaussian_noise, photos


def test_fashion_mnist():
    try:
        x, y = fashion_mnist("test")
    except BoaError as err:
        if "apt-get" in str(err):
            pytest.skip(f"Debian's dataset-fashion-mnist is not available: {err}")
        raise
    assert x.shape == (10_000, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (10_000,) and y.dtype == torch.int64
    assert y.min() == 0 and y.max() == 9 and (y.bincount() == 1000).all()
    assert 0.25 < x.float().mean() / 255 < 0.32  # Fashion-MNIST's mean pixel is 0.286
    with pytest.raises(BoaError, match="split"):
        fashion_mnist("valid")


def test_photos():
    pytest.importorskip("skimage")
    images, names = photos(64)
    assert images.shape == (len(names), 3, 64, 64) and images.dtype == torch.float32
    assert len(names) % 10 == 0 and len(names) >= 40 and len(set(names)) == len(names)
    assert "chelsea/centre" in names and "coffee/bottom-right-flip" in names
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.1
    i = names.index("chelsea/centre")
    assert torch.equal(images[i + 1], images[i].flip(-1))  # each view is followed by its mirror
    assert not torch.equal(images[i], images[i + 2])  # the corner crops differ from the centre


def test_gaussian_noise():
    _, spec = build_vision_model("fmnist-resnet")
    a, b = gaussian_noise(4, spec, seed=1), gaussian_noise(4, spec, seed=1)
    assert a.shape == (4, 1, 28, 28) and torch.equal(a, b)
    assert not torch.equal(a, gaussian_noise(4, spec, seed=2))
