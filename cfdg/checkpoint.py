"""Self-describing training checkpoints, written atomically, loaded without unpickling code.

A run directory contains `checkpoints/step_XXXXXXXX/`, each with:

- `model.safetensors`: the online weights (safetensors);
- `ema.safetensors`: the EMA weights, used for sampling by default (safetensors);
- `state.pt`: optimizer state, step, RNG states and data-iterator position, read with
  `torch.load(weights_only=True)`;
- `info.json`: dataset, class names, preset, UNet arguments, image shape, null id, log-SNR range,
  resolved config and package version.

A checkpoint folder is written under a temporary name and renamed into place, so a reader sees
either the whole folder or none of it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cfdg.errors import UserError

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "state.pt"
INFO_FILE = "info.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Return the complete checkpoint folders of a run, oldest step first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / INFO_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    info: dict[str, Any],
    keep_every: int = 0,
) -> Path:
    """Write the checkpoint of `step` atomically, then delete older ones not kept.

    Args:
        model_state, ema_state: State dicts of the online and EMA networks.
        state: Tensors and plain values for `state.pt` (optimizer, RNG, data position).
        info: JSON-ready description of the model and run; `step` is added.
        keep_every: Also keep checkpoints whose step is a multiple of this (0: keep only the last).

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / (final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()

    # Write every file into the temporary folder, then swap it in with one rename.
    metadata = {"step": str(step), "format": "cfdg"}
    save_file(_contiguous(model_state), tmp / MODEL_FILE, metadata=metadata)
    save_file(_contiguous(ema_state), tmp / EMA_FILE, metadata=metadata)
    torch.save(state, tmp / STATE_FILE)
    (tmp / INFO_FILE).write_text(json.dumps({**info, "step": step}, indent=2, default=str) + "\n")
    if final.exists():
        old = root / (final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)

    # Keep the newest checkpoint and every keep_every-th one.
    for path in list_checkpoints(run_dir)[:-1]:
        old_step = int(_STEP_DIR.match(path.name).group(1))
        if path != final and not (keep_every and old_step % keep_every == 0):
            shutil.rmtree(path)
    return final


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Return the checkpoint folder for a run directory, a checkpoint folder or a file in one.

    Raises:
        UserError: if no complete checkpoint is found there.
    """
    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    if (path / INFO_FILE).is_file() and (path / MODEL_FILE).is_file():
        return path
    if path.name == CHECKPOINT_DIR:
        path = path.parent
    latest = latest_checkpoint(path)
    if latest is None:
        if not path.exists():
            raise UserError(f"checkpoint not found: {path} does not exist")
        raise UserError(
            f"no checkpoint in {path}: expected a run directory with {CHECKPOINT_DIR}/step_*/ or "
            f"a checkpoint folder holding {INFO_FILE} and {MODEL_FILE}"
        )
    return latest


def read_info(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Return the parsed info.json of a checkpoint folder (or run directory)."""
    folder = resolve_checkpoint(checkpoint)
    try:
        return json.loads((folder / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {folder / INFO_FILE}: {err}") from None


def read_state(checkpoint: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load state.pt of a checkpoint with `weights_only=True`, so no pickled code can run."""
    path = resolve_checkpoint(checkpoint) / STATE_FILE
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def read_weights(
    checkpoint: str | os.PathLike, ema: bool = True, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Load the EMA (default) or online weights of a checkpoint from safetensors."""
    path = resolve_checkpoint(checkpoint) / (EMA_FILE if ema else MODEL_FILE)
    try:
        return load_file(path, device=str(map_location))
    except (OSError, RuntimeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def build_from_info(info: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the untrained network described by a checkpoint's info."""
    from cfdg.nn.unet import UNet

    return UNet(info["image_shape"], info["num_classes"], **info["unet"])


def load_model(
    path: str | os.PathLike, ema: bool = True, map_location: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a trained network for sampling.

    Args:
        path: A run directory (its newest checkpoint is used), a checkpoint folder or a file in one.
        ema: Load the EMA weights (default) rather than the online ones.
        map_location: Device of the returned model.

    Returns:
        `(model, info)`: the network in eval mode, and a dict with num_classes, class_names,
        image_shape, dataset, preset, step, logsnr_min, logsnr_max, null_label, config and path.
    """
    folder = resolve_checkpoint(path)
    info = read_info(folder)
    model = build_from_info(info)
    weights = read_weights(folder, ema=ema, map_location="cpu")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{folder}: weights do not match the network in {INFO_FILE} (missing "
            f"{missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(map_location).eval()
    info = {**info, "path": str(folder), "image_shape": tuple(info["image_shape"])}
    return model, info
