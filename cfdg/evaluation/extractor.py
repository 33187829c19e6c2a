"""The built-in evaluator: a small CNN classifier whose pooled features and logits feed the metrics.

Standard Inception weights cannot be downloaded here, and a user's data may look nothing like
ImageNet, so cfdg trains its own classifier on the training split of the data set. Its
penultimate layer (D = 128 values per image) serves FID and precision/recall, and its logits
serve the Inception Score and the label accuracy.

An evaluator is stored as `NAME.safetensors` (weights, with the metadata also embedded) plus
`NAME.json`. Its content hash is the sha256 of the architecture and of the weight tensors
(names, dtypes, shapes, bytes). Every metric record carries the hash and cached reference
statistics are keyed by it, so numbers from different evaluators are not compared by mistake.

Shapes: N batch, C channels, H height, W width, K classes, D feature size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from cfdg.config import option
from cfdg.distributed import check_device
from cfdg.errors import UserError
from cfdg.images import to_model_range

log = logging.getLogger(__name__)

FEATURE_LAYER = "pool"
MAX_INPUT_SIDE = 64
WEIGHTS_NAME = "evaluator.safetensors"


def default_cache_dir() -> Path:
    """Return the cache folder: `$CFDG_CACHE`, else `$XDG_CACHE_HOME/cfdg`, else ~/.cache/cfdg."""
    if os.environ.get("CFDG_CACHE"):
        return Path(os.environ["CFDG_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "cfdg"


def default_evaluator_path(dataset: str) -> Path:
    """Return where `train-evaluator` stores the evaluator of `dataset` when no --out is given."""
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(dataset).name)
    return default_cache_dir() / "evaluators" / f"{stem or 'data'}.safetensors"


def tqdm_disable(progress: bool | None) -> bool | None:
    """Map a progress flag (None: only on a terminal) to tqdm's `disable` argument."""
    return None if progress is None else not progress


class EvaluatorNet(nn.Module):
    """Three conv stages (16, 32, 64 channels) with batch norm, then a 128-unit feature layer.

    Each stage ends with a 2x max pool while the side is at least 8 pixels, so 8x8, 28x28 and
    64x64 inputs all work. An adaptive average pool to at most 4x4 feeds the fully connected
    feature layer (ReLU), and a linear head gives the logits. Images whose size differs from
    `input_size` are resized first (bilinear, antialiased), real and generated alike.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        input_size: tuple[int, int],
        widths: tuple[int, ...] = (16, 32, 64),
        feature_size: int = 128,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.input_size = tuple(input_size)
        self.widths = tuple(widths)
        layers: list[nn.Module] = []
        channels, side = in_channels, min(self.input_size)
        for width in self.widths:
            layers += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if side >= 8:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            channels = width
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(min(side, 4))
        self.fc = nn.Linear(channels * min(side, 4) ** 2, feature_size)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_size, num_classes)
        self.num_features = feature_size
        self.feature_size = feature_size

    def architecture(self) -> dict[str, Any]:
        """Return the constructor arguments, which with the weights define the network."""
        return {
            "in_channels": self.in_channels,
            "num_classes": self.num_classes,
            "input_size": list(self.input_size),
            "widths": list(self.widths),
            "feature_size": self.feature_size,
        }

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 images [N, C, H, W] to float [N, C, h, w] in [-1, 1] at the input size."""
        x = to_model_range(images)
        if tuple(x.shape[-2:]) != self.input_size:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", antialias=True)
        return x

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return pooled features [N, D] and logits [N, K] of preprocessed images [N, C, h, w]."""
        features = F.relu(self.fc(self.pool(self.body(x)).flatten(1)))
        return features, self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def weights_hash(net: EvaluatorNet) -> str:
    """Return the sha256 hex digest of the architecture and of every tensor in the state dict."""
    digest = hashlib.sha256(json.dumps(net.architecture(), sort_keys=True).encode())
    for name, tensor in sorted(net.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(
            tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        )
    return digest.hexdigest()


class Evaluator:
    """A trained evaluator network with its metadata. `extract` turns images into features.

    Attributes:
        net: The classifier, in eval mode.
        metadata: Data set, class names, test accuracy and training settings.
        hash: Content hash (see `weights_hash`).
    """

    kind = "cfdg-evaluator"
    layer = FEATURE_LAYER

    def __init__(self, net: EvaluatorNet, metadata: dict[str, Any]):
        self.net = net.eval()
        self.metadata = metadata
        self.hash = weights_hash(net)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.net.in_channels, *self.net.input_size)

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def describe(self) -> dict[str, Any]:
        """Return the record that names this extractor in every metric row."""
        return {
            "kind": self.kind,
            "hash": self.hash,
            "layer": self.layer,
            "input_size": list(self.input_shape),
            "num_features": self.net.num_features,
            "dataset": self.metadata.get("dataset"),
        }

    def check_images(self, images: torch.Tensor) -> None:
        """Raise UserError unless `images` are uint8 [N, C, H, W] with this network's channels."""
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise UserError(
                f"expected uint8 images [N, C, H, W], got {images.dtype} {tuple(images.shape)}; "
                "quantise with cfdg.images.to_uint8 first"
            )
        if images.shape[1] != self.net.in_channels:
            raise UserError(
                f"images have {images.shape[1]} channels but the evaluator expects "
                f"{self.net.in_channels}; train an evaluator on data like these images"
            )

    @torch.no_grad()
    def extract(
        self, images: torch.Tensor, batch_size: int = 256, progress: bool | None = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return features [N, D] and logits [N, K] (float32, CPU) for uint8 images [N, C, H, W].

        Every image is processed, including a last batch smaller than `batch_size`.
        """
        self.check_images(images)
        device = next(self.net.parameters()).device
        features, logits = [], []
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc="features", disable=tqdm_disable(progress)):
            batch = self.net.preprocess(images[start : start + batch_size].to(device))
            feats, logit = self.net.features_and_logits(batch)
            features.append(feats.float().cpu())
            logits.append(logit.float().cpu())
        if not features:
            raise UserError("no images to evaluate: the image set is empty")
        return torch.cat(features), torch.cat(logits)


@dataclass
class EvaluatorConfig:
    """Settings of `cfdg train-evaluator`."""

    data: str = option(
        "fashion-mnist",
        "data set: fashion-mnist, digits, a folder of class subfolders or an .npz file",
        metavar="DATA",
    )
    out: str | None = option(
        None,
        "where to write the evaluator (.safetensors, JSON beside it); none writes "
        "$CFDG_CACHE/evaluators/DATA.safetensors, where `cfdg sweep` finds it",
        metavar="PATH",
    )
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files", metavar="DIR")
    image_size: int | None = option(None, "resize the data to this side length in pixels")
    epochs: int = option(8, "passes over the training split")
    batch_size: int = option(128, "images per optimiser step")
    lr: float = option(3e-3, "peak learning rate of the one-cycle AdamW schedule")
    weight_decay: float = option(5e-4, "AdamW weight decay")
    seed: int = option(0, "seed of the weights and of the batch order")
    device: str = option("cpu", "device to train on: cpu or cuda")


def fit(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: EvaluatorConfig,
    progress: bool | None = None,
) -> EvaluatorNet:
    """Train an `EvaluatorNet` on uint8 images [N, C, H, W] and int64 labels [N] in [0, K).

    Uses AdamW with a one-cycle learning-rate schedule and cross-entropy loss. Input side
    lengths above 64 pixels are resized down to 64 inside the network.
    """
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    height, width = images.shape[-2:]
    scale = min(1.0, MAX_INPUT_SIDE / max(height, width))
    input_size = (max(1, round(height * scale)), max(1, round(width * scale)))
    device = torch.device(config.device)
    net = EvaluatorNet(images.shape[1], num_classes, input_size).to(device)

    # One-cycle AdamW over all epochs; the last batch of an epoch may be smaller.
    steps_per_epoch = math.ceil(images.shape[0] / config.batch_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=steps_per_epoch * config.epochs
    )
    net.train()
    for epoch in range(config.epochs):
        order = torch.randperm(images.shape[0], generator=generator)
        total_loss, correct = 0.0, 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"evaluator epoch {epoch + 1}",
            disable=tqdm_disable(progress),
        )
        for step in bar:
            index = order[step * config.batch_size : (step + 1) * config.batch_size]
            x = net.preprocess(images[index].to(device))
            y = labels[index].to(device)
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(index)
            correct += (logits.argmax(1) == y).sum().item()
        log.info(
            "evaluator epoch %d/%d: loss %.4f, train accuracy %.4f",
            epoch + 1,
            config.epochs,
            total_loss / images.shape[0],
            correct / images.shape[0],
        )
    return net.eval()


@torch.no_grad()
def accuracy(evaluator: Evaluator, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction of uint8 images [N, C, H, W] classified as their labels [N]."""
    _, logits = evaluator.extract(images)
    return (logits.argmax(1) == labels.cpu()).double().mean().item()


def save_evaluator(evaluator: Evaluator, path: str | os.PathLike) -> Path:
    """Write the evaluator to `path` (.safetensors) and its metadata to the `.json` beside it.

    Both files are written to temporary names and renamed.
    """
    from safetensors.torch import save_file

    path = resolve_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        **evaluator.metadata,
        "architecture": evaluator.net.architecture(),
        "extractor": evaluator.describe(),
    }
    state = {k: v.detach().cpu().contiguous() for k, v in evaluator.net.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={"cfdg": json.dumps(record, sort_keys=True)})
    os.replace(tmp, path)
    json_path = path.with_suffix(".json")
    json_tmp = json_path.with_name(json_path.name + ".tmp")
    json_tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(json_tmp, json_path)
    return path


def resolve_path(path: str | os.PathLike) -> Path:
    """Return the `.safetensors` file for `path`: the path itself, or WEIGHTS_NAME in a folder."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        return path
    return path / WEIGHTS_NAME


def load_evaluator(path: str | os.PathLike, device: str | torch.device = "cpu") -> Evaluator:
    """Load an evaluator written by `save_evaluator` (a .safetensors file or its folder).

    Raises:
        UserError: if the file is missing or is not a cfdg evaluator.
    """
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    file = resolve_path(path)
    if not file.is_file():
        raise UserError(
            f"evaluator not found: {file}; train one with `cfdg train-evaluator --data DATA`"
        )
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get("cfdg")
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as err:
        raise UserError(f"failed to read evaluator {file}: {err}") from None
    if raw is None:
        raise UserError(f"{file} is not a cfdg evaluator (no 'cfdg' metadata in the file)")
    record = json.loads(raw)
    arch = record["architecture"]
    net = EvaluatorNet(
        arch["in_channels"],
        arch["num_classes"],
        tuple(arch["input_size"]),
        tuple(arch["widths"]),
        arch["feature_size"],
    )
    net.load_state_dict(state)
    metadata = {k: v for k, v in record.items() if k not in ("architecture", "extractor")}
    evaluator = Evaluator(net.to(device), metadata)
    stored = record.get("extractor", {}).get("hash")
    if stored and stored != evaluator.hash:
        raise UserError(f"evaluator {file} is corrupt: its weights do not match the stored hash")
    return evaluator


def train_evaluator(config: EvaluatorConfig, progress: bool | None = None) -> Path:
    """Train the evaluator on the training split of `config.data`, test it, and save it.

    Returns:
        The path of the written `.safetensors` file. Its metadata contains the test accuracy.
    """
    from cfdg.data import load_dataset

    if config.epochs < 1 or config.batch_size < 1:
        raise UserError(
            f"invalid epochs {config.epochs} / batch size {config.batch_size}: both must be >= 1"
        )
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise UserError(f"--lr must be a positive number, got {config.lr}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise UserError(f"--weight-decay must be 0 or more, got {config.weight_decay}")
    check_device(config.device)
    out = resolve_path(config.out) if config.out else default_evaluator_path(config.data)
    train = load_dataset(config.data, "train", config.data_dir, config.image_size)
    test = load_dataset(config.data, "test", config.data_dir, config.image_size)
    log.info(
        "training evaluator on %s: %d train / %d test images %s, %d classes",
        train.name,
        len(train),
        len(test),
        train.image_shape,
        train.num_classes,
    )

    # Train, then measure accuracy on the held-out split.
    start = time.perf_counter()
    with torch.random.fork_rng():
        net = fit(train.images, train.labels, train.num_classes, config, progress)
    seconds = time.perf_counter() - start
    metadata = {
        "dataset": train.name,
        "class_names": list(train.class_names),
        "image_shape": list(train.image_shape),
        "train_seconds": round(seconds, 1),
        "config": dataclasses.asdict(config),
    }
    evaluator = Evaluator(net.cpu(), metadata)
    evaluator.metadata["test_accuracy"] = accuracy(evaluator, test.images, test.labels)
    log.info(
        "evaluator test accuracy %.4f on %d images (trained in %.0f s); hash %s",
        evaluator.metadata["test_accuracy"],
        len(test),
        seconds,
        evaluator.hash[:12],
    )
    return save_evaluator(evaluator, out)
