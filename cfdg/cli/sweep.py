"""`cfdg sweep`: FID, IS, precision and recall over guidance weights, with table, plots, grids."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from cfdg import config as cfg
from cfdg.cli import add_log_file
from cfdg.cli.common import add_config_option
from cfdg.evaluation.sweep import SweepConfig, run_sweep

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="score samples over guidance weights w (FID, IS, precision, recall)",
        description="For each guidance weight w, draw N class-balanced samples with the same "
        "per-image seeds, score them against real images, and write metrics.csv/json/md, "
        "FID-vs-IS plots, sample grids and the samples (.npz). Rerun to resume; run under "
        "torchrun to split the sampling across processes.",
    )
    parser.add_argument("checkpoint", help="run directory or checkpoint folder")
    add_config_option(parser)
    cfg.add_options(parser, SweepConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = cfg.build(SweepConfig, args, args.config, section="sweep")
    add_log_file(str(Path(config.out) / "log.txt"))
    rows = run_sweep(config)
    log.info("wrote %d rows to %s", len(rows), Path(config.out) / "metrics.csv")
    return 0
