"""Conversions between uint8 images and the model range [-1, 1], and labelled PNG grids.

Shapes use one legend in the whole package: N batch, C channels, H height, W width.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 images [N, C, H, W] in {0..255} to float32 in [-1, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    return images.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Quantise float images [N, C, H, W] in [-1, 1] to uint8, clamping values outside the range.

    Real and generated images both pass through this one function before any metric, so that
    FID of a set against itself is zero.
    """
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def to_hwc_numpy(images: torch.Tensor) -> np.ndarray:
    """Return uint8 [N, H, W, C] numpy images (the ADM `.npz` layout) from uint8 [N, C, H, W]."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def from_hwc_numpy(array: np.ndarray) -> torch.Tensor:
    """Return uint8 [N, C, H, W] tensors from uint8 [N, H, W, C] or grey [N, H, W] numpy images."""
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images of shape [N, H, W, C], got {array.dtype} {tuple(array.shape)}"
        )
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def save_grid(
    images: torch.Tensor,
    path: str | os.PathLike,
    nrow: int | None = None,
    labels: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    row_titles: Sequence[str] | None = None,
) -> Path:
    """Write a PNG grid of images [N, C, H, W] (uint8, or float in [-1, 1]), row-major.

    Args:
        nrow: Images per row; defaults to ceil(sqrt(N)).
        labels: Optional class id per image, drawn as a caption when `class_names` is given.
        title: Optional figure title.
        row_titles: Optional text left of each row (for example the guidance weight).

    Returns:
        The path written. The file is written to a temporary name and renamed, so a reader never
        sees a half-written PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if images.ndim != 4:
        raise ValueError(f"expected images of shape [N, C, H, W], got {tuple(images.shape)}")
    pixels = to_hwc_numpy(images if images.dtype == torch.uint8 else to_uint8(images))
    n = pixels.shape[0]
    ncol = nrow or max(1, math.ceil(math.sqrt(n)))
    nrows = max(1, math.ceil(n / ncol))
    captions = labels is not None and class_names is not None
    cell = 1.1 if captions else 0.9
    fig, axes = plt.subplots(
        nrows,
        ncol,
        figsize=(ncol * 0.9 + (0.8 if row_titles else 0), nrows * cell + 0.4),
        squeeze=False,
    )
    for index, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if index >= n:
            ax.axis("off")
            continue
        image = pixels[index]
        if image.shape[-1] == 1:
            ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(image, interpolation="nearest")
        if captions:
            ax.set_title(str(class_names[int(labels[index])]), fontsize=6, pad=2)
    if row_titles:
        for row, text in enumerate(row_titles[:nrows]):
            axes[row, 0].set_ylabel(text, fontsize=7, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    # Leave the top strip to the title, so that it does not overlap the first row.
    top = 1.0 - 0.35 / (nrows * cell + 0.4) if title else 1.0
    fig.tight_layout(pad=0.3, rect=(0.0, 0.0, 1.0, top))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def save_npz(
    path: str | os.PathLike,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    settings: dict | None = None,
) -> Path:
    """Write samples in the ADM evaluation layout, atomically, with settings in a JSON beside it.

    `arr_0` holds uint8 images [N, H, W, C] and `arr_1` int64 labels [N]; `settings` (checkpoint,
    w, steps, v, seed, ...) go to the same path with the suffix `.json`.

    Args:
        images: uint8 [N, C, H, W], or float in [-1, 1] (quantised with `to_uint8`).
    """
    import json

    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"sample file must end in .npz, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"arr_0": to_hwc_numpy(images)}
    if labels is not None:
        arrays["arr_1"] = labels.to(torch.int64).cpu().numpy()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)
    if settings is not None:
        meta = path.with_suffix(".json")
        meta_tmp = meta.with_name(meta.name + ".tmp")
        meta_tmp.write_text(json.dumps(settings, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(meta_tmp, meta)
    return path


def load_npz(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an ADM-layout sample file: uint8 images [N, C, H, W] and int64 labels [N] or None."""
    from cfdg.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"sample file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "arr_0" not in data:
                raise UserError(
                    f"{path} has no arr_0; expected the ADM layout (arr_0 images, arr_1 labels)"
                )
            images = from_hwc_numpy(data["arr_0"])
            labels = torch.from_numpy(data["arr_1"].astype(np.int64)) if "arr_1" in data else None
    except (OSError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"cannot read {path} as a .npz sample file: {err}") from None
    if labels is not None and labels.shape != (images.shape[0],):
        raise UserError(
            f"{path}: arr_1 has shape {tuple(labels.shape)}, expected [{images.shape[0]}]"
        )
    return images, labels
