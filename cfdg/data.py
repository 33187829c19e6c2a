"""Labelled image data sets and the resumable, rank-sharded training batch iterator.

Every loader returns an `ImageData`: uint8 images [N, C, H, W] and int64 labels [N] in
[0, K), K = len(class_names). Sources:

- `fashion-mnist`: IDX `.gz` files (Debian's `dataset-fashion-mnist`, or torchvision's
  `FashionMNIST/raw/` layout);
- `digits`: scikit-learn's 8x8 digits, 0..16 scaled to 0..255, a fixed stratified 80/20 split;
- a folder: one subfolder of PNG/JPEG images per class, class ids in sorted folder-name order;
- an `.npz` file: `arr_0`/`arr_1` (the ADM sample layout, [N, H, W, C]) or `images`/`labels`;
- downsampled ImageNet: a folder of `train_data_batch_*.npz` / `val_data.npz`, whose `data` is
  uint8 [N, 3*64*64] channel-major and whose `labels` are 1-based.

Files are read with `np.load(allow_pickle=False)`, so no file can run code.
"""

from __future__ import annotations

import gzip
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cfdg.errors import UserError
from cfdg.images import from_hwc_numpy, to_model_range

log = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "test")
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass
class ImageData:
    """A labelled image set held in memory.

    Attributes:
        images: uint8 tensor [N, C, H, W].
        labels: int64 tensor [N], class ids in [0, len(class_names)).
        class_names: Name of each class id.
        name: Source of the data, for logs and checkpoints.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]


def load_dataset(
    source: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    image_size: int | None = None,
) -> ImageData:
    """Load a labelled image set by name or path, validated.

    Args:
        source: "fashion-mnist", "digits", a folder of class subfolders, a folder of downsampled-
            ImageNet `.npz` batches, or an `.npz` file.
        split: "train" or "test".
        data_dir: Folder of the Fashion-MNIST files (default /usr/share/datasets/fashion-mnist).
        image_size: Side length in pixels to resize (and for folders center-crop) to; None keeps the
            stored size (for a folder, the shorter side of its first image).

    Raises:
        UserError: for a missing or unreadable file, an empty folder, inconsistent shapes or
            labels outside [0, number of classes).
    """
    if split not in SPLITS:
        raise UserError(f"invalid split {split!r}: use one of {', '.join(SPLITS)}")
    if image_size is not None and image_size < 1:
        raise UserError(f"invalid image size {image_size}: must be a positive number of pixels")

    # Dispatch on the name, then on what the path is.
    path = Path(source).expanduser()
    if source == "fashion-mnist":
        data = _load_fashion_mnist(split, data_dir)
    elif source == "digits":
        data = _load_digits(split)
    elif path.is_file() and path.suffix == ".npz":
        data = _load_npz(path)
    elif path.is_dir() and _imagenet_batch_files(path, split):
        data = _load_imagenet_batches(path, split)
    elif path.is_dir():
        data = _load_folder(path, split, image_size)
    elif path.suffix == ".npz":
        raise UserError(f"npz file not found: {path}")
    else:
        raise UserError(
            f"unknown data source {source!r}: use fashion-mnist, digits, a folder with one "
            "subfolder of PNG/JPEG images per class, or an .npz file of images and labels"
        )

    if image_size is not None and data.images.shape[-2:] != (image_size, image_size):
        data.images = resize_images(data.images, image_size)
    validate(data)
    log.debug("loaded %s %s: %d images %s", data.name, split, len(data), data.image_shape)
    return data


def validate(data: ImageData) -> None:
    """Check dtypes, shapes and label range of `data`.

    Raises:
        UserError: naming the data set and the value that is wrong.
    """
    images, labels = data.images, data.labels
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError(
            f"{data.name}: images must be uint8 [N, C, H, W], got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    if images.shape[1] not in (1, 3):
        raise UserError(f"{data.name}: images must have 1 or 3 channels, got {images.shape[1]}")
    if images.shape[0] == 0:
        raise UserError(f"{data.name}: the data set is empty")
    if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
        raise UserError(
            f"{data.name}: labels must be int64 [N] with N = {images.shape[0]} images, got "
            f"{labels.dtype} {tuple(labels.shape)}"
        )
    if not data.class_names:
        raise UserError(f"{data.name}: no class names")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= data.num_classes:
        raise UserError(
            f"{data.name}: labels must lie in [0, {data.num_classes}), found {low}..{high}"
        )


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images [N, C, H, W] to [N, C, size, size] (center crop, then antialiased
    bilinear resampling), in chunks so that large sets stay within memory."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    images = images[..., top : top + side, left : left + side]
    if side == size:
        return images.contiguous()
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], 4096):
        chunk = images[start : start + 4096].float()
        chunk = F.interpolate(chunk, size=(size, size), mode="bilinear", antialias=True)
        out[start : start + 4096] = chunk.round().clamp(0, 255).to(torch.uint8)
    return out


# Fashion-MNIST (IDX files).


def _find_idx_file(directories: list[Path], stem: str) -> Path | None:
    for directory in directories:
        for name in (stem + ".gz", stem):
            if (directory / name).is_file():
                return directory / name
    return None


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Read one IDX file (big-endian header: magic 0x0000 08 D, then D int32 sizes, then uint8)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            raw = file.read()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if len(raw) < 4 + 4 * expected_dims:
        raise UserError(f"{path} is too short to be an IDX file")
    zero, dtype_code, dims = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
        raise UserError(
            f"{path} is not a uint8 IDX file with {expected_dims} dimensions "
            f"(header {raw[:4].hex()})"
        )
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise UserError(
            f"{path}: header gives shape {shape} but the file has {body.size} bytes of data"
        )
    return body.reshape(shape)


def _load_fashion_mnist(split: str, data_dir: str | Path | None) -> ImageData:
    root = Path(data_dir).expanduser() if data_dir else FASHION_MNIST_DIR
    directories = [root, root / "FashionMNIST" / "raw", root / "raw"]
    image_stem, label_stem = _IDX_FILES[split]
    image_file = _find_idx_file(directories, image_stem)
    label_file = _find_idx_file(directories, label_stem)
    if image_file is None or label_file is None:
        missing = image_stem if image_file is None else label_stem
        raise UserError(
            f"Fashion-MNIST file {missing}.gz not found in {root} (nor in its FashionMNIST/raw/): "
            "install it with `apt-get install dataset-fashion-mnist` or pass `--data-dir DIR`"
        )
    images = _read_idx(image_file, 3)
    labels = _read_idx(label_file, 1)
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"{image_file} contains {images.shape[0]} images but {label_file} contains "
            f"{labels.shape[0]} labels"
        )
    return ImageData(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=list(FASHION_MNIST_CLASSES),
        name="fashion-mnist",
    )


# scikit-learn digits.


def _load_digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    index = np.arange(len(pixels))
    train_index, test_index = train_test_split(
        index, test_size=0.2, random_state=0, stratify=digits.target
    )
    chosen = np.sort(train_index if split == "train" else test_index)
    return ImageData(
        images=torch.from_numpy(pixels[chosen]).unsqueeze(1).contiguous(),
        labels=torch.from_numpy(digits.target[chosen].astype(np.int64)),
        class_names=[str(d) for d in range(10)],
        name="digits",
    )


# A folder with one subfolder of images per class.


def _load_folder(root: Path, split: str, image_size: int | None) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    # A folder may hold train/ and test/ splits, each with class subfolders.
    if (root / split).is_dir():
        root = root / split
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(
            f"{root} has no class subfolders: put each class's images in its own folder"
        )
    files: list[tuple[Path, int]] = []
    for class_id, class_dir in enumerate(class_dirs):
        images = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise UserError(f"class folder {class_dir} contains no .png, .jpg or .jpeg images")
        files.extend((p, class_id) for p in images)

    # Decode; grey only when every image is grey, RGB otherwise.
    decoded = []
    for path, _ in files:
        try:
            with Image.open(path) as image:
                image.load()
                decoded.append(image.copy())
        except (OSError, UnidentifiedImageError) as err:
            raise UserError(f"cannot read image {path}: {err}") from None
    grey = all(image.mode in ("L", "1", "I;16") for image in decoded)
    size = image_size or min(decoded[0].size)

    arrays = [_crop_resize(image.convert("L" if grey else "RGB"), size) for image in decoded]
    return ImageData(
        images=from_hwc_numpy(np.stack(arrays)),
        labels=torch.tensor([class_id for _, class_id in files], dtype=torch.int64),
        class_names=[d.name for d in class_dirs],
        name=str(root),
    )


def _crop_resize(image: Any, size: int) -> np.ndarray:
    """Resize so the shorter side is `size` (bicubic), then crop the center square."""
    from PIL import Image

    width, height = image.size
    scale = size / min(width, height)
    new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
    if new_size != image.size:
        image = image.resize(new_size, Image.BICUBIC)
    left, top = (new_size[0] - size) // 2, (new_size[1] - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


# .npz arrays.


def _open_npz(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def _load_npz(path: Path) -> ImageData:
    with _open_npz(path) as arrays:
        keys = set(arrays.files)
        if {"data", "labels"} <= keys and "images" not in keys:
            return _load_imagenet_batches(path.parent, None, files=[path])
        if {"arr_0", "arr_1"} <= keys:
            image_key, label_key = "arr_0", "arr_1"
        elif {"images", "labels"} <= keys:
            image_key, label_key = "images", "labels"
        else:
            raise UserError(
                f"{path} must hold arr_0/arr_1 or images/labels arrays, found {sorted(keys)}"
            )
        try:
            images, labels = arrays[image_key], arrays[label_key]
            names = arrays["class_names"] if "class_names" in keys else None
        except ValueError as err:  # An object array needs pickle, which stays off.
            raise UserError(f"cannot read {path}: {err}") from None

    images = _npz_images_to_nchw(images, path)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}"
        )
    if names is not None:
        class_names = [str(n) for n in names.tolist()]
    else:
        class_names = [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
    return ImageData(
        images=images,
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=class_names,
        name=str(path),
    )


def _npz_images_to_nchw(images: np.ndarray, path: Path) -> torch.Tensor:
    """Accept uint8 [N, H, W, C] (ADM layout), [N, H, W] (grey) or [N, C, H, W] with C in {1, 3}."""
    if images.dtype != np.uint8:
        raise UserError(f"{path}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        return from_hwc_numpy(images)
    if images.ndim == 4 and images.shape[-1] in (1, 3):
        return from_hwc_numpy(images)
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return torch.from_numpy(np.ascontiguousarray(images))
    raise UserError(
        f"{path}: images must be [N, H, W, C] or [N, C, H, W] with 1 or 3 channels, "
        f"got {images.shape}"
    )


# Downsampled ImageNet (Chrabaszcz et al., 2017) batches.


def _imagenet_batch_files(directory: Path, split: str) -> list[Path]:
    pattern = "train_data_batch_*.npz" if split == "train" else "val_data*.npz"
    return sorted(directory.glob(pattern))


def _load_imagenet_batches(
    directory: Path, split: str | None, files: list[Path] | None = None
) -> ImageData:
    files = files or _imagenet_batch_files(directory, split or "train")
    images, labels = [], []
    for path in files:
        with _open_npz(path) as arrays:
            if not {"data", "labels"} <= set(arrays.files):
                raise UserError(f"{path} must hold `data` and `labels`, found {arrays.files}")
            data, batch_labels = arrays["data"], np.asarray(arrays["labels"]).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] % 3:
            raise UserError(f"{path}: data must be uint8 [N, 3*S*S], got {data.dtype} {data.shape}")
        side = int(round((data.shape[1] // 3) ** 0.5))
        if 3 * side * side != data.shape[1]:
            raise UserError(f"{path}: rows of {data.shape[1]} values are not 3 square channels")
        if batch_labels.shape[0] != data.shape[0]:
            raise UserError(f"{path}: {data.shape[0]} images but {batch_labels.shape[0]} labels")
        images.append(torch.from_numpy(data.reshape(-1, 3, side, side)))
        labels.append(torch.from_numpy(batch_labels.astype(np.int64) - 1))  # 1-based on disk.
    if len({tuple(t.shape[1:]) for t in images}) > 1:
        raise UserError(f"{directory}: batch files hold images of different sizes")
    return ImageData(
        images=torch.cat(images),
        labels=torch.cat(labels),
        class_names=[str(i) for i in range(1000)],
        name=f"imagenet{images[0].shape[-1]}",
    )


# Training batches.


class BatchIterator:
    """Endless training batches, reshuffled each epoch, one shard per rank, resumable.

    Epoch e uses a permutation drawn from a generator seeded by (seed, e), the same on every rank;
    rank r takes positions r, r + world_size, ... of it, trimmed so that every rank yields the same
    number of full batches. The position (epoch, batch index) is the whole state, so a restored
    iterator yields exactly the batches the original one would have.

    Args:
        data: The training set.
        batch_size: Images per batch on this rank.
        seed: Seed of the shuffles and flips.
        rank: This process's rank; world_size: number of ranks.
        hflip: Flip each image left-right with probability 1/2 (a fresh draw every epoch).
        device: Where batches are placed.
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        hflip: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.hflip = hflip
        self.device = torch.device(device)
        self.per_rank = len(data) // world_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(
                f"batch of {batch_size} images per rank is larger than the {self.per_rank} images "
                f"each of {world_size} rank(s) gets from {data.name}: lower --batch-size"
            )
        self.epoch = 0
        self.index = 0
        self._order: torch.Tensor | None = None
        self._flips: torch.Tensor | None = None

    def _prepare_epoch(self) -> None:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        permutation = torch.randperm(len(self.data), generator=generator)
        flips = torch.rand(len(self.data), generator=generator) < 0.5
        shard = slice(self.rank, self.rank + self.world_size * self.per_rank, self.world_size)
        self._order = permutation[shard]
        self._flips = flips[shard] if self.hflip else None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (images float32 [B, C, H, W] in [-1, 1], labels int64 [B])."""
        if self.index >= self.batches_per_epoch:
            self.epoch += 1
            self.index = 0
            self._order = None
        if self._order is None:
            self._prepare_epoch()
        chosen = slice(self.index * self.batch_size, (self.index + 1) * self.batch_size)
        rows = self._order[chosen]
        images = to_model_range(self.data.images[rows])
        if self._flips is not None:
            flip = self._flips[chosen].view(-1, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images)
        self.index += 1
        return images.to(self.device), self.data.labels[rows].to(self.device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by `state_dict`; its seed must match this iterator's."""
        if int(state["seed"]) != self.seed:
            raise UserError(
                f"checkpoint data order used seed {state['seed']}, this run {self.seed}: resume "
                "with the same --seed"
            )
        self.epoch = int(state["epoch"])
        self.index = int(state["index"])
        self._order = None
