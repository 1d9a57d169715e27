"""Images for the vision models, all offline: Fashion-MNIST (Debian's dataset-fashion-mnist), a few natural colour
photographs bundled with installed packages (scikit-image, matplotlib, scikit-learn), and Gaussian noise."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from boa.core.debian import unpacked_deb
from boa.core.errors import BoaError
from boa.core.io import atomic_file, cache_dir

FMNIST_DEB = "dataset-fashion-mnist"
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FMNIST_SIZES = {"train": 60_000, "test": 10_000}

# scikit-image photos shipped inside its wheel (the others need `pooch` downloads); natural scenes only.
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: magic 0x0000 08 ndim, then ndim big-endian int32 sizes, then the data."""
    raw = gzip.decompress(path.read_bytes())
    (magic,) = struct.unpack(">I", raw[:4])
    if magic != 0x0800 + ndim:
        raise BoaError(f"{path.name}: IDX magic {magic:#010x}, expected {0x0800 + ndim:#010x} (uint8, {ndim}-D)")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise BoaError(f"{path.name}: {data.size} bytes of data for shape {shape}")
    return data.reshape(shape)


def _read_fmnist(folder: Path) -> dict[str, np.ndarray]:
    arrays = {}
    for split, (images, labels) in FMNIST_FILES.items():
        x, y = _read_idx(folder / images, 3), _read_idx(folder / labels, 1)
        if x.shape != (FMNIST_SIZES[split], 28, 28) or y.shape != (FMNIST_SIZES[split],) or y.max() > 9:
            raise BoaError(f"Fashion-MNIST {split}: unexpected images {x.shape} / labels {y.shape}, max {y.max()}")
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = x, y
    return arrays


def _fmnist_from_deb() -> dict[str, np.ndarray]:
    with unpacked_deb(FMNIST_DEB, "BOA_FMNIST_DEB", "Fashion-MNIST") as root:
        return _read_fmnist(root.joinpath(*FMNIST_DIR.parts[1:]))


def fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST "train" (60,000) or "test" (10,000): images uint8 (N, 28, 28) and labels int64 (N,).
    Parsed once (from the installed Debian package, else its downloaded .deb) into the cache."""
    if split not in FMNIST_FILES:
        raise BoaError(f"Fashion-MNIST split {split!r}: use one of {tuple(FMNIST_FILES)}")
    path = cache_dir("data") / "fashion-mnist.npz"
    if not path.exists():
        arrays = _read_fmnist(FMNIST_DIR) if FMNIST_DIR.is_dir() else _fmnist_from_deb()
        with atomic_file(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append ".npz"
            np.savez(f, **arrays)
    with np.load(path) as data:
        images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Natural photographs


def _skimage_photos() -> list[tuple[str, np.ndarray]]:
    try:
        import skimage.data
    except ImportError:
        return []
    found = []
    for name in SKIMAGE_PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # a photo this version lacks or would download: skip it
            continue
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity); the left view
            name, image = "motorcycle", image[0]
        found.append((name, image))
    return found


def _matplotlib_photos() -> list[tuple[str, np.ndarray]]:
    try:
        from matplotlib.cbook import get_sample_data
        from PIL import Image

        with Image.open(get_sample_data("grace_hopper.jpg", asfileobj=False)) as image:
            return [("grace_hopper", np.asarray(image.convert("RGB")))]
    except Exception:  # matplotlib or its sample data not installed
        return []


def _sklearn_photos() -> list[tuple[str, np.ndarray]]:
    try:
        from sklearn.datasets import load_sample_images
    except ImportError:
        return []
    bunch = load_sample_images()
    return [(Path(f).stem, image) for f, image in zip(bunch.filenames, bunch.images)]


def crop_views(image: torch.Tensor, size: int) -> list[tuple[str, torch.Tensor]]:
    """Ten views of a (3, H, W) image: short side resized to size*8/7, then the centre and four corner crops of
    size x size, each also mirrored."""
    h, w = image.shape[-2:]
    scale = round(size * 8 / 7) / min(h, w)
    resized = F.interpolate(image[None], size=(max(size, round(h * scale)), max(size, round(w * scale))),
                            mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    h, w = resized.shape[-2:]
    corners = {"centre": ((h - size) // 2, (w - size) // 2), "top-left": (0, 0), "top-right": (0, w - size),
               "bottom-left": (h - size, 0), "bottom-right": (h - size, w - size)}
    views = []
    for where, (top, left) in corners.items():
        crop = resized[:, top : top + size, left : left + size]
        views += [(where, crop), (f"{where}-flip", crop.flip(-1))]
    return views


def photos(size: int = 224) -> tuple[torch.Tensor, list[str]]:
    """Natural colour photographs from installed packages, ten views each (centre and corner crops, mirrored):
    float (N, 3, size, size) in [0, 1] and names like "chelsea/top-left-flip"."""
    sources = _skimage_photos() + _matplotlib_photos() + _sklearn_photos()
    if not sources:
        raise BoaError("no bundled photographs found: `pip install scikit-image` (or matplotlib / scikit-learn)")
    images, names = [], []
    for name, array in sources:
        image = torch.from_numpy(np.array(array[..., :3])).permute(2, 0, 1).float() / 255
        for where, view in crop_views(image, size):
            images.append(view)
            names.append(f"{name}/{where}")
    return torch.stack(images).contiguous(), names


def gaussian_noise(n: int, spec, seed: int = 0) -> torch.Tensor:
    """n standard normal images of the model's input shape, already in its normalised input space."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, spec.in_channels, spec.image_size, spec.image_size, generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# Per model: calibration and evaluation sets, in the model's input space


def real_images(spec, n: int, seed: int = 0) -> torch.Tensor:
    """n real training images for few-shot calibration (a seeded random subset of the training split)."""
    if spec.dataset != "fashion-mnist":
        raise BoaError(f"no real {spec.dataset} training images are packaged for {spec.name}; calibrate with "
                       "--data genie (zero-shot) or noise")
    images, _ = fashion_mnist("train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
    return spec.normalise(images[pick].float().div(255).unsqueeze(1))


def evaluation_images(spec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels): the Fashion-MNIST test set; for ImageNet models the bundled photographs, unlabelled
    (they measure agreement with the float model)."""
    if spec.dataset == "fashion-mnist":
        images, labels = fashion_mnist("test")
        return spec.normalise(images.float().div(255).unsqueeze(1)), labels
    return spec.normalise(photos(spec.image_size)[0]), None
