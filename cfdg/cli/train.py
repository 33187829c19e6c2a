"""`cfdg train`: train a class-conditional UNet (also under `torchrun` for DDP)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from cfdg import config as cfg
from cfdg.cli.common import add_config_option
from cfdg.errors import UserError
from cfdg.nn.presets import PRESETS
from cfdg.train import TrainConfig, Trainer, validate_config

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    presets = "; ".join(f"{name}: {p.description}" for name, p in PRESETS.items())
    parser = subparsers.add_parser(
        "train",
        help="train a class-conditional diffusion model",
        description="Train a UNet eps-model with label dropout (classifier-free guidance). "
        "Run the same command under `torchrun --nproc_per_node N` for data-parallel training. "
        f"Presets: {presets}.",
    )
    add_config_option(parser)
    parser.add_argument(
        "--dry-run", action="store_true", help="print the resolved config as JSON and exit"
    )
    cfg.add_options(parser, TrainConfig)
    parser.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Build the config: defaults < saved run config (with --resume) < --config file < flags."""
    given = {k: v for k, v in vars(args).items() if k in _field_names()}
    config = cfg.build(TrainConfig, given, args.config, section="train")
    if config.resume:
        config = _with_saved_config(config, given, args.config)
    validate_config(config)
    return config


def _field_names() -> set[str]:
    return {field.name for field in dataclasses.fields(TrainConfig)}


def _with_saved_config(config: TrainConfig, given: dict, config_path: str | None) -> TrainConfig:
    """On --resume, start from the run's saved config so that unspecified options keep their
    values; options given now (flags or --config) still win."""
    from cfdg.checkpoint import latest_checkpoint, read_info

    folder = latest_checkpoint(config.out)
    if folder is None:
        raise UserError(f"--resume: no checkpoint in {config.out}/checkpoints to resume from")
    saved = {k: v for k, v in read_info(folder)["config"].items() if k in _field_names()}
    # The saved device is the resolved one, for example cuda:0. A resumed run picks its own
    # unless --device is given, so a GPU run can continue on another machine.
    saved.pop("device", None)
    explicit = dict(given)
    if config_path:
        explicit.update(
            {k: v for k, v in cfg.read_config_file(config_path, "train").items() if k in saved}
        )
    return TrainConfig(**{**saved, **explicit, "out": config.out, "resume": True})


def run(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.dry_run:
        json.dump(cfg.to_dict(config), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0

    from cfdg.cli import add_log_file

    add_log_file(f"{config.out}/log.txt")
    trainer = Trainer(config)
    run_dir = trainer.run()
    log.info("run directory: %s", run_dir)
    # A run stopped by a signal saved its checkpoint but did not finish. Exit 130, as for Ctrl-C,
    # so that a shell chain such as `cfdg train && cfdg sweep` stops there.
    return 0 if trainer.stop_reason in ("max_steps", "minutes") else 130
