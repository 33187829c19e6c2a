"""`cfdg sample`: draw guided samples from a checkpoint into an ADM-layout .npz file."""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cfdg import config as cfg
from cfdg.cli.common import add_config_option, load_checkpoint, parse_classes
from cfdg.errors import UserError
from cfdg.images import save_npz, to_hwc_numpy
from cfdg.samplers import sample_in_batches

log = logging.getLogger(__name__)


@dataclass
class SampleConfig:
    w: float = cfg.option(
        1.0, "guidance weight w of (1 + w) eps(z, c) - w eps(z); 0 is conditional"
    )
    classes: str = cfg.option(
        "all",
        "class ids or names to draw, comma-separated, cycled over the samples; all for every class",
        metavar="LIST",
    )
    num_samples: int = cfg.option(64, "number of images")
    steps: int = cfg.option(256, "sampling steps T (network evaluations per image)")
    v: float = cfg.option(0.3, "variance interpolation v in [0, 1] of the reverse step")
    clip: bool = cfg.option(True, "clip the predicted x to [-1, 1] at every step")
    seed: int = cfg.option(0, "seed of image 0; image i uses seed + i")
    batch_size: int = cfg.option(256, "images per network batch (two rows each when w != 0)")
    ema: bool = cfg.option(True, "use the EMA weights (--no-ema for the online weights)")
    device: str = cfg.option("auto", "device: auto, cpu, cuda or cuda:N")
    out: str = cfg.option(
        "samples.npz", "output .npz file (arr_0 uint8 [N, H, W, C], arr_1 labels)", metavar="PATH"
    )
    png: str | None = cfg.option(
        None, "also write each image as a PNG into this folder", metavar="DIR"
    )


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sample",
        help="draw guided samples into an .npz file",
        description="Draw class-conditional samples with classifier-free guidance weight w.",
    )
    parser.add_argument("checkpoint", help="run directory or checkpoint file")
    add_config_option(parser)
    cfg.add_options(parser, SampleConfig)
    parser.set_defaults(func=run)


def labels_for(classes: list[int], num_samples: int) -> torch.Tensor:
    """Cycle `classes` over `num_samples` images: balanced when N is a multiple of K."""
    return torch.tensor([classes[i % len(classes)] for i in range(num_samples)], dtype=torch.int64)


def run(args: argparse.Namespace) -> int:
    config = cfg.build(SampleConfig, args, args.config, section="sample")
    if config.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {config.num_samples}")
    if not config.out.endswith(".npz"):
        raise UserError(f"--out must end in .npz, got {config.out!r}")
    model, info = load_checkpoint(args.checkpoint, ema=config.ema, device=config.device)
    classes = parse_classes(config.classes, info["class_names"])
    labels = labels_for(classes, config.num_samples)

    start = time.perf_counter()
    images = sample_in_batches(
        model,
        labels,
        config.w,
        batch_size=config.batch_size,
        seed=config.seed,
        steps=config.steps,
        v=config.v,
        clip=config.clip,
        logsnr_min=info.get("logsnr_min", -20.0),
        logsnr_max=info.get("logsnr_max", 20.0),
    )
    elapsed = time.perf_counter() - start
    settings = {
        "checkpoint": str(info.get("path", args.checkpoint)),
        "step": info.get("step"),
        **cfg.to_dict(config),
        "class_names": info["class_names"],
    }
    save_npz(config.out, images, labels, settings)
    log.info("wrote %d samples to %s in %.1f s", len(labels), config.out, elapsed)
    if config.png:
        write_pngs(images, labels, info["class_names"], Path(config.png))
        log.info("wrote %d PNG files to %s", len(labels), config.png)
    return 0


def write_pngs(images: torch.Tensor, labels: torch.Tensor, class_names, folder: Path) -> None:
    """Write each image of `images` [N, C, H, W] in [-1, 1] as an H x W PNG of its pixels.

    Each file is written to a temporary name and renamed, so no PNG is left half-written.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(to_hwc_numpy(images)):
        path = folder / f"{i:05d}_{class_names[int(labels[i])]}.png".replace("/", "-")
        image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        tmp = path.with_name(path.name + ".tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
