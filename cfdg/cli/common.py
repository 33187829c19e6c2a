"""Helpers shared by the subcommands: parsing lists, loading a checkpoint, choosing a device."""

from __future__ import annotations

import argparse
import logging
import math

import torch

from cfdg.errors import UserError

log = logging.getLogger(__name__)


def add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML or YAML file of options (keys as in --help, with _ or -); flags override it",
    )


def parse_floats(text: str | float | list, name: str) -> list[float]:
    """Parse '0,0.5,1' (or a number or list from a config file) into finite floats."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        values = [float(text)]
    elif isinstance(text, (list, tuple)):
        values = [float(v) for v in text]
    else:
        try:
            values = [float(part) for part in str(text).split(",") if part.strip()]
        except ValueError:
            raise UserError(f"--{name} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise UserError(f"--{name} is empty; give at least one value, for example 0,1,3")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise UserError(f"--{name} values must be finite, got {bad[0]}")
    return values


def parse_classes(text: str | list | None, class_names: list[str]) -> list[int]:
    """Parse class ids or names ('0,3,7' or 'Dress,Bag'); None or '' means every class."""
    num_classes = len(class_names)
    if text is None or text == "" or text == "all":
        return list(range(num_classes))
    parts = text if isinstance(text, (list, tuple)) else str(text).split(",")
    lowered = {name.lower(): i for i, name in enumerate(class_names)}
    ids = []
    for part in parts:
        token = str(part).strip()
        if token.lstrip("-").isdigit():
            index = int(token)
        elif token.lower() in lowered:
            index = lowered[token.lower()]
        else:
            raise UserError(
                f"unknown class {token!r}; use ids 0..{num_classes - 1} or names: "
                + ", ".join(class_names)
            )
        if not 0 <= index < num_classes:
            raise UserError(
                f"class id {index} is out of range; allowed ids are 0..{num_classes - 1}"
            )
        ids.append(index)
    return ids


def resolve_device(name: str | None) -> torch.device:
    """Return the requested device, or CUDA when available and the CPU otherwise."""
    from cfdg.distributed import check_device

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(name)
    return torch.device(name)


def load_checkpoint(path: str, ema: bool = True, device: str | None = None):
    """Load a model for sampling from a run directory or a checkpoint, in eval mode."""
    from cfdg.checkpoint import load_model

    model, info = load_model(path, ema=ema, map_location="cpu")
    model.to(resolve_device(device)).eval()
    log.info(
        "loaded %s (%s weights, step %s, data %s)",
        info.get("path", path),
        "EMA" if ema else "online",
        info.get("step"),
        info.get("dataset"),
    )
    return model, info
