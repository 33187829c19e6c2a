"""`cfdg grid`: a labelled PNG grid, one row per class, same seeds in every row."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch

from cfdg import config as cfg
from cfdg.cli.common import add_config_option, load_checkpoint, parse_classes
from cfdg.errors import UserError
from cfdg.images import save_grid
from cfdg.samplers import sample_in_batches

log = logging.getLogger(__name__)


@dataclass
class GridConfig:
    w: float = cfg.option(1.0, "guidance weight w; 0 is conditional, -1 unconditional")
    classes: str = cfg.option(
        "all",
        "class ids or names, one row each, comma-separated; all for every class",
        metavar="LIST",
    )
    per_class: int = cfg.option(8, "images per row (column j uses seed + j in every row)")
    steps: int = cfg.option(256, "sampling steps T")
    v: float = cfg.option(0.3, "variance interpolation v in [0, 1]")
    clip: bool = cfg.option(True, "clip the predicted x to [-1, 1] at every step")
    seed: int = cfg.option(0, "seed of column 0")
    batch_size: int = cfg.option(256, "images per network batch")
    ema: bool = cfg.option(True, "use the EMA weights (--no-ema for the online weights)")
    device: str = cfg.option("auto", "device: auto, cpu, cuda or cuda:N")
    out: str = cfg.option("grid.png", "output PNG file", metavar="PATH")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "grid",
        help="write a labelled PNG grid of samples",
        description="Write a PNG grid with one row per class; column j uses the same seed in "
        "every row, so rows differ only by their label.",
    )
    parser.add_argument("checkpoint", help="run directory or checkpoint file")
    add_config_option(parser)
    cfg.add_options(parser, GridConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = cfg.build(GridConfig, args, args.config, section="grid")
    if config.per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {config.per_class}")
    model, info = load_checkpoint(args.checkpoint, ema=config.ema, device=config.device)
    names = info["class_names"]
    classes = parse_classes(config.classes, names)
    labels = torch.tensor([c for c in classes for _ in range(config.per_class)], dtype=torch.int64)
    seeds = [config.seed + j for _ in classes for j in range(config.per_class)]
    images = sample_in_batches(
        model,
        labels,
        config.w,
        batch_size=config.batch_size,
        seed=seeds,
        steps=config.steps,
        v=config.v,
        clip=config.clip,
        logsnr_min=info.get("logsnr_min", -20.0),
        logsnr_max=info.get("logsnr_max", 20.0),
    )
    save_grid(
        images,
        config.out,
        nrow=config.per_class,
        row_titles=row_titles(config.w, classes, names),
        title=f"w = {config.w:g}, T = {config.steps}"
        + (" (unconditional: every row ignores its class)" if config.w == -1 else ""),
    )
    log.info("wrote %s", config.out)
    return 0


def row_titles(w: float, classes: list[int], names: list[str]) -> list[str]:
    """Return the class name of each row, or "unconditional" where w = -1 cancels the label."""
    # At w = -1, (1 + w) eps(z, c) - w eps(z) is eps(z), so rows with the same seeds are identical.
    if w == -1:
        return ["unconditional"] * len(classes)
    return [names[c] for c in classes]
