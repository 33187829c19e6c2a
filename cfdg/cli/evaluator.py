"""`cfdg train-evaluator`: train the feature network that scores samples of one data set."""

from __future__ import annotations

import argparse
import json
import logging

from cfdg import config as cfg
from cfdg.cli.common import add_config_option
from cfdg.evaluation.extractor import EvaluatorConfig, train_evaluator

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-evaluator",
        help="train the classifier whose features give FID, IS and precision/recall",
        description="Train a small CNN classifier on the training split of a data set and "
        "report its test accuracy. Its pooled features and logits replace Inception-v3 for "
        "FID, IS, precision/recall and label accuracy, for any image size and channel count.",
    )
    add_config_option(parser)
    cfg.add_options(parser, EvaluatorConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = cfg.build(EvaluatorConfig, args, args.config, section="train-evaluator")
    path = train_evaluator(config)
    record = json.loads(path.with_suffix(".json").read_text())
    print(
        f"evaluator {path} (hash {record['extractor']['hash'][:12]}): test accuracy "
        f"{record['test_accuracy']:.4f}, trained in {record['train_seconds']:.0f} s"
    )
    return 0
