"""`cfdg evaluate`: score one sample file (ADM .npz layout) against real images."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cfdg import config as cfg
from cfdg.cli.common import add_config_option, resolve_device
from cfdg.config import option
from cfdg.errors import UserError
from cfdg.evaluation.metrics import evaluate_images
from cfdg.evaluation.reference import reference_stats
from cfdg.evaluation.sweep import ExtractorOptions, check_extractor_options, load_extractor

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig(ExtractorOptions):
    """Settings of `cfdg evaluate`."""

    samples: str = option("", "sample .npz file", cli=False)
    out: str | None = option(None, "also write the metrics to this JSON file", metavar="PATH")
    seed: int = option(0, "seed of the IS split permutation and the precision/recall subsets")


def dataset_of(settings: dict[str, Any] | None) -> str | None:
    """Return the data set named by a sample file's settings, or by the checkpoint they name."""
    if not settings:
        return None
    if settings.get("dataset"):
        return settings["dataset"]
    checkpoint = settings.get("checkpoint")
    if checkpoint and Path(checkpoint).exists():
        from cfdg.checkpoint import read_info

        return read_info(checkpoint).get("dataset")
    return None


def evaluate_samples(config: EvaluateConfig, progress: bool | None = None) -> dict[str, Any]:
    """Score the sample file `config.samples` and return the metrics record.

    Labels (`arr_1`) are optional; label accuracy is reported only when they are present.

    Raises:
        UserError: for a missing file, no reference, or a reference from another extractor.
    """
    from cfdg.images import load_npz

    check_extractor_options(config)
    images, labels = load_npz(config.samples)
    settings_path = Path(config.samples).with_suffix(".json")
    settings = None
    if settings_path.is_file():
        try:
            settings = json.loads(settings_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(
                f"invalid settings file {settings_path}: {err}; fix or remove it and pass "
                "--reference"
            ) from None
        if not isinstance(settings, dict):
            raise UserError(
                f"settings file {settings_path} must contain a JSON object; fix or remove it"
            )
    dataset = dataset_of(settings)
    source = config.reference or dataset
    if source is None:
        raise UserError(
            f"no reference for {config.samples}: pass --reference DATA (a data set, an image "
            ".npz or a stats .safetensors)"
        )
    device = resolve_device(config.device)
    extractor = load_extractor(config, dataset or config.reference, device)
    reference = reference_stats(
        extractor,
        source,
        config.reference_split,
        config.data_dir,
        config.reference_cache,
        config.batch_size,
        progress=progress,
    )
    record = evaluate_images(
        extractor,
        images,
        labels,
        reference,
        config.batch_size,
        config.is_splits,
        config.nearest_k,
        config.pr_max_samples,
        config.seed,
        progress=progress,
    )
    record["samples"] = str(config.samples)
    record["settings"] = settings
    return record


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a sample .npz file (FID, IS, precision, recall, label accuracy)",
        description="Score samples in the ADM layout (arr_0 uint8 [N, H, W, C], optional arr_1 "
        "labels), including files written by other tools, and print the metrics as JSON.",
    )
    parser.add_argument("samples", help="sample .npz file")
    add_config_option(parser)
    cfg.add_options(parser, EvaluateConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = cfg.build(EvaluateConfig, args, args.config, section="evaluate")
    record = evaluate_samples(config)
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    if config.out:
        cfg.save_json(record, config.out)
    print(text)
    return 0
