"""Reference features of real images, cached on disk.

A reference is the feature matrix [M, D] of a real image set (by default the test split of the
training data). It is cached as safetensors under `CACHE/reference/`, keyed by the extractor
hash and by the sha256 of the image and label bytes, so a changed data set or another
extractor never reuses stale statistics. FID, precision and recall are computed from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cfdg.errors import UserError
from cfdg.evaluation.extractor import default_cache_dir
from cfdg.images import load_npz

log = logging.getLogger(__name__)


@dataclass
class ReferenceStats:
    """Features of a real image set and where they came from.

    Attributes:
        features: float32 [M, D].
        extractor: `describe()` record of the extractor that produced them.
        data: Source, split, image count and sha256 of the images.
        path: Cache file, if any.
    """

    features: torch.Tensor
    extractor: dict[str, Any]
    data: dict[str, Any]
    path: Path | None = None

    def check_extractor(self, extractor: Any) -> None:
        """Raise UserError unless these statistics were computed by `extractor`."""
        if self.extractor.get("hash") != extractor.hash:
            raise UserError(
                f"reference statistics {self.path or ''} were computed with extractor "
                f"{str(self.extractor.get('hash'))[:12]}, not {extractor.hash[:12]}; "
                "recompute them with this extractor (drop the stats file or --reference-cache)"
            )


def images_digest(images: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """Return the sha256 hex digest of uint8 images [N, C, H, W] (shape and bytes) and labels."""
    digest = hashlib.sha256(f"{list(images.shape)}|".encode())
    digest.update(images.contiguous().numpy().tobytes())
    if labels is not None:
        digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_stats(stats: ReferenceStats, path: str | os.PathLike) -> Path:
    """Write reference statistics to a safetensors file (temporary name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    metadata = {"extractor": json.dumps(stats.extractor), "data": json.dumps(stats.data)}
    save_file({"features": stats.features.contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def load_stats(path: str | os.PathLike) -> ReferenceStats:
    """Read statistics written by `save_stats`.

    Raises:
        UserError: if the file is missing or holds no cfdg reference statistics.
    """
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"reference statistics not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            features = handle.get_tensor("features")
    except (SafetensorError, KeyError) as err:
        raise UserError(f"failed to read reference statistics {path}: {err}") from None
    if "extractor" not in metadata:
        raise UserError(f"{path} is not a cfdg statistics file: its extractor record is missing")
    return ReferenceStats(
        features, json.loads(metadata["extractor"]), json.loads(metadata["data"]), path
    )


def load_reference_images(
    source: str, split: str = "test", data_dir: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Load real images for a reference: a data set (`cfdg.data.load_dataset`) or an image npz.

    An `.npz` with only `arr_0` (such as an ADM reference batch) is read without labels.

    Returns:
        uint8 images [M, C, H, W], labels [M] or None, and a name for the records.
    """
    path = Path(source).expanduser()
    if path.suffix == ".npz" and path.is_file():
        with np.load(path, allow_pickle=False) as arrays:
            if "arr_0" in arrays.files and "arr_1" not in arrays.files:
                images, labels = load_npz(path)
                return images, labels, str(path)
    from cfdg.data import load_dataset

    data = load_dataset(source, split, data_dir)
    return data.images, data.labels, data.name


def reference_stats(
    extractor: Any,
    source: str,
    split: str = "test",
    data_dir: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    refresh: bool = False,
    progress: bool | None = False,
) -> ReferenceStats:
    """Return the features of a real image set, from the cache when present.

    Args:
        extractor: `Evaluator` or `InceptionExtractor`.
        source: Data set name or path, an image `.npz`, or a stats `.safetensors` file
            written by `save_stats` (used as is, after checking its extractor hash).
        split: Split of a data set source ("test" by default).
        cache_dir: Cache folder; default `default_cache_dir()` (`$CFDG_CACHE`, ~/.cache/cfdg).
        refresh: Recompute even when a cached file exists.

    Raises:
        UserError: for a stats file from another extractor, or an unreadable source.
    """
    if str(source).endswith(".safetensors"):
        stats = load_stats(source)
        stats.check_extractor(extractor)
        return stats

    # The cache key covers the extractor and the exact image bytes.
    images, labels, name = load_reference_images(source, split, data_dir)
    data_hash = images_digest(images, labels)
    key = hashlib.sha256(f"{extractor.hash}|{data_hash}".encode()).hexdigest()[:24]
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in Path(name).name)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = cache / "reference" / f"{stem}-{split}-{key}.safetensors"
    if path.is_file() and not refresh:
        stats = load_stats(path)
        stats.check_extractor(extractor)
        log.info("reference statistics from cache %s (%d images)", path, stats.features.shape[0])
        return stats

    # Extract and store.
    features, _ = extractor.extract(images, batch_size=batch_size, progress=progress)
    data = {
        "source": str(source),
        "name": name,
        "split": split,
        "num_images": int(images.shape[0]),
        "image_shape": list(images.shape[1:]),
        "images_sha256": data_hash,
    }
    stats = ReferenceStats(features, extractor.describe(), data, path)
    save_stats(stats, path)
    log.info(
        "reference statistics of %s %s (%d images) saved to %s", name, split, len(images), path
    )
    return stats
