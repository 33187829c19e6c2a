"""`cfdg demo`: the main job on the default data: train, fit the evaluator, sweep w, report.

The stages share one wall-clock budget (`--minutes`): training takes `train_fraction` of it, the
evaluator trains for a fixed number of epochs, and the sweep draws as many samples per w as the
time left allows (measured from the trained network's speed). Each stage that finished is skipped
when the same command runs again, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cfdg import config as cfg
from cfdg.cli.common import add_config_option, parse_floats, resolve_device
from cfdg.distributed import check_device
from cfdg.errors import UserError
from cfdg.nn.presets import get_preset

log = logging.getLogger(__name__)

DEMO_W = "0,0.1,0.3,0.5,1,2,4"


@dataclass
class DemoConfig:
    data: str = cfg.option(
        "auto",
        "data set: auto (fashion-mnist when installed, else digits), or any `cfdg train` source",
    )
    data_dir: str | None = cfg.option(None, "folder of the Fashion-MNIST IDX files", metavar="DIR")
    out: str = cfg.option(
        "runs/demo", "output folder for the model, evaluator and sweep", metavar="DIR"
    )
    minutes: float = cfg.option(25.0, "wall-clock budget of the whole demo in minutes")
    train_fraction: float = cfg.option(
        0.5, "share of the budget spent training the diffusion model"
    )
    preset: str = cfg.option("cpu", "network preset of the diffusion model")
    batch_size: int | None = cfg.option(None, "training batch; none takes the preset's")
    evaluator_epochs: int = cfg.option(
        5, "epochs of evaluator training (5 reach about 92% test accuracy on Fashion-MNIST)"
    )
    w: str = cfg.option(DEMO_W, "guidance weights of the sweep, comma-separated", metavar="LIST")
    steps: int = cfg.option(64, "sampling steps T of the sweep (the paper uses 256)")
    num_samples: int = cfg.option(
        0, "samples per w; 0 sizes it to the time left (at least 10 per class)"
    )
    max_samples: int = cfg.option(2000, "upper bound on the automatic samples per w")
    grid_size: int = cfg.option(40, "images per sample grid")
    seed: int = cfg.option(0, "seed of training and of the sweep's images")
    device: str = cfg.option("auto", "device: auto, cpu, cuda or cuda:N")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train, fit the evaluator, sweep w and report, on the default data",
        description="Run the whole pipeline within a time budget: train a class-conditional "
        "diffusion model, train the evaluator, sweep the guidance weight w, and write the table, "
        "FID/IS plots and same-seed grids. Running it again continues an interrupted demo.",
    )
    add_config_option(parser)
    cfg.add_options(parser, DemoConfig)
    parser.set_defaults(func=run)


def pick_data(config: DemoConfig) -> str:
    """Return the data set to use: Fashion-MNIST when its files load, else scikit-learn's digits."""
    from cfdg.data import load_dataset

    if config.data != "auto":
        return config.data
    try:
        load_dataset("fashion-mnist", "test", config.data_dir)
    except UserError as err:
        log.warning("Fashion-MNIST not available (%s); using scikit-learn's 8x8 digits", err)
        return "digits"
    return "fashion-mnist"


def validate(config: DemoConfig) -> list[float]:
    weights = parse_floats(config.w, "w")
    checks = [
        (config.minutes > 0, f"--minutes must be positive, got {config.minutes}"),
        (
            0 < config.train_fraction < 1,
            f"--train-fraction must be in (0, 1), got {config.train_fraction}",
        ),
        (config.steps >= 2, f"--steps must be at least 2, got {config.steps}"),
        (
            config.num_samples >= 0,
            f"--num-samples must be 0 (automatic) or more, got {config.num_samples}",
        ),
        (
            config.evaluator_epochs >= 1,
            f"--evaluator-epochs must be at least 1, got {config.evaluator_epochs}",
        ),
        (math.isfinite(config.minutes), f"--minutes must be finite, got {config.minutes}"),
        (config.max_samples >= 1, f"--max-samples must be at least 1, got {config.max_samples}"),
        (config.grid_size >= 0, f"--grid-size must be 0 or more, got {config.grid_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    get_preset(config.preset)
    check_device(config.device)
    return weights


class DemoState:
    """Finished stages, stored in OUT/demo_state.json so that a second run skips them."""

    def __init__(self, path: Path):
        self.path = path
        self.stages = json.loads(path.read_text()) if path.is_file() else {}

    def done(self, stage: str) -> bool:
        return stage in self.stages

    def finish(self, stage: str, **details) -> None:
        self.stages[stage] = details
        cfg.save_json(self.stages, self.path)


def time_per_row(model, image_shape, device: torch.device, batch: int = 256) -> float:
    """Measure seconds per image row of one no-grad forward pass (median of 3 after a warm-up)."""
    z = torch.randn(batch, *image_shape, device=device)
    logsnr = torch.zeros(batch, device=device)
    labels = torch.zeros(batch, dtype=torch.int64, device=device)
    times = []
    with torch.no_grad():
        model(z, logsnr, labels)
        for _ in range(3):
            start = time.perf_counter()
            model(z, logsnr, labels)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sorted(times)[1] / batch


def choose_num_samples(
    config: DemoConfig,
    weights: list[float],
    seconds_left: float,
    num_classes: int,
    row_seconds: float,
) -> int:
    """Size the samples per w so that sampling every w fits in `seconds_left`."""
    rows_per_image = sum(1 if w == 0 else 2 for w in weights) * config.steps
    # Keep 25% of the time for features, metrics, grids and plots.
    affordable = max(0, int(0.75 * seconds_left / (rows_per_image * row_seconds)))
    minimum = 10 * num_classes
    count = min(config.max_samples, max(minimum, affordable))
    count -= count % num_classes
    if seconds_left <= 0:
        log.warning(
            "the time budget was spent %.0f s before the sweep (training and the evaluator took "
            "longer than planned, for example on a busy machine); drawing the minimum of %d "
            "samples per w, so the demo will run past --minutes",
            abs(seconds_left),
            count,
        )
    elif affordable < minimum:
        log.warning(
            "the time left (%.0f s) affords only %d samples per w; drawing the minimum of %d, "
            "so the demo will run past --minutes",
            seconds_left,
            affordable,
            count,
        )
    return count


def run(args: argparse.Namespace) -> int:
    from cfdg.checkpoint import latest_checkpoint, load_model
    from cfdg.evaluation.extractor import EvaluatorConfig, train_evaluator
    from cfdg.evaluation.sweep import SweepConfig, run_sweep
    from cfdg.train import TrainConfig, train

    start = time.monotonic()
    config = cfg.build(DemoConfig, args, args.config, section="demo")
    weights = validate(config)
    device = resolve_device(config.device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_json(cfg.to_dict(config), out / "demo_config.json")
    state = DemoState(out / "demo_state.json")
    data = pick_data(config)
    log.info(
        "demo: data %s, preset %s, budget %.1f min, output %s",
        data,
        config.preset,
        config.minutes,
        out,
    )

    # 1. Train the diffusion model for its share of the budget.
    model_dir = out / "model"
    if not state.done("train"):
        train_minutes = config.minutes * config.train_fraction
        log.info("demo 1/3: training the %s preset for %.1f min", config.preset, train_minutes)
        train(
            TrainConfig(
                data=data,
                data_dir=config.data_dir,
                preset=config.preset,
                out=str(model_dir),
                batch_size=config.batch_size,
                max_steps=10**9,
                minutes=train_minutes,
                sample_every=0 if config.minutes < 5 else 500,
                seed=config.seed,
                device=str(device),
                # A demo killed before its first checkpoint starts training again.
                resume=latest_checkpoint(model_dir) is not None,
            )
        )
        state.finish("train", minutes=train_minutes)

    # 2. Train the evaluator that supplies features for FID, precision/recall and logits for IS.
    evaluator_path = out / "evaluator.safetensors"
    if not state.done("evaluator"):
        log.info("demo 2/3: training the evaluator for %d epochs", config.evaluator_epochs)
        train_evaluator(
            EvaluatorConfig(
                data=data,
                data_dir=config.data_dir,
                out=str(evaluator_path),
                epochs=config.evaluator_epochs,
                seed=config.seed,
                device=str(device),
            )
        )
        state.finish("evaluator")

    # 3. Sweep w with as many samples as the time left affords.
    model, info = load_model(model_dir, map_location=device)
    num_samples = config.num_samples
    if num_samples == 0:
        seconds_left = config.minutes * 60 - (time.monotonic() - start)
        row_seconds = time_per_row(model, info["image_shape"], device)
        num_samples = choose_num_samples(
            config, weights, seconds_left, info["num_classes"], row_seconds
        )
    del model
    log.info(
        "demo 3/3: sweeping w = %s with %d samples each, T = %d",
        config.w,
        num_samples,
        config.steps,
    )
    rows = run_sweep(
        SweepConfig(
            checkpoint=str(model_dir),
            out=str(out / "sweep"),
            w=config.w,
            num_samples=num_samples,
            steps=config.steps,
            seed=config.seed,
            evaluator=str(evaluator_path),
            data_dir=config.data_dir,
            grid_size=config.grid_size,
            device=str(device),
        )
    )
    state.finish("sweep", num_samples=num_samples)
    print_summary(rows, out, data, time.monotonic() - start)
    return 0


def _format(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def print_summary(rows: list[dict], out: Path, data: str, seconds: float) -> None:
    """Print the sweep table and the paths of the outputs."""
    header = f"{'w':>6} {'FID':>8} {'IS':>7} {'precision':>9} {'recall':>7} {'label acc':>9}"
    lines = [
        f"\ncfdg demo on {data}: finished in {seconds / 60:.1f} min",
        header,
        "-" * len(header),
    ]
    for row in rows:
        lines.append(
            f"{row['w']:>6g} {_format(row.get('fid')):>8} {_format(row.get('is_mean')):>7} "
            f"{_format(row.get('precision'), 3):>9} {_format(row.get('recall'), 3):>7} "
            f"{_format(row.get('label_accuracy'), 3):>9}"
        )
    sweep = out / "sweep"
    lines += [
        "",
        f"table:  {sweep / 'metrics.md'}  (also metrics.csv, metrics.json)",
        f"plots:  {sweep / 'fid_vs_is.png'}, {sweep / 'fid_is_vs_w.png'}",
        f"grids:  {sweep}/grid_w*.png",
        f"model:  {out / 'model'}  "
        f"(try: cfdg grid {out / 'model'} --w 3 --steps 64 --out grid.png)",
    ]
    print("\n".join(lines))
