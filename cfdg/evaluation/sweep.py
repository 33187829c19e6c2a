"""The guidance sweep: sample N images per guidance weight w, score them, write table, plots, grids.

Every w uses the same per-image seeds (image i: seed + i) and the same balanced labels
(i mod K): common random numbers, so the differences between w values come from guidance
alone and the FID/IS curve is smooth. Under `torchrun` each rank samples a contiguous slice of
the seeds. An image depends only on its seed, label and settings, so the gathered set and every
metric equal those of a one-process run. Rank 0 scores and writes.

Outputs in the sweep folder (each written to a temporary name, then renamed):

| file | content |
| --- | --- |
| `metrics.csv`, `metrics.json`, `metrics.md` | one row per w: FID, IS, precision, recall, ... |
| `fid_vs_is.png`, `fid_is_vs_w.png` | FID against IS, and both against w |
| `samples_w{w}.npz` + `.json` | the N samples (ADM layout) and their settings |
| `grid_w{w}.png` | a random class per cell, the same seeds for every w |
| `grid_class{c}_w{w}.png`, `grid_class{c}.png` | one class; the second has one row per w |

A rerun with the same settings resumes: saved rows are kept and saved sample files are scored
without sampling again.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cfdg.config import option
from cfdg.errors import UserError
from cfdg.evaluation.extractor import default_evaluator_path, load_evaluator, tqdm_disable
from cfdg.evaluation.metrics import evaluate_images
from cfdg.evaluation.reference import reference_stats

log = logging.getLogger(__name__)

DEFAULT_W = "0,0.1,0.2,0.3,0.5,1,2,3,4,5"
# Settings that must match for a saved row or sample file to be reused.
RESUME_KEYS = (
    "checkpoint",
    "checkpoint_step",
    "num_samples",
    "steps",
    "v",
    "clip",
    "seed",
    "ema",
    "extractor_hash",
    "reference_sha256",
    "is_splits",
    "nearest_k",
    "pr_max_samples",
)
# Settings that must match for a saved sample file to be reused.
SAMPLE_KEYS = RESUME_KEYS[:8]
TABLE_COLUMNS = (
    ("w", "w", "{:g}"),
    ("fid", "FID", "{:.3f}"),
    ("is_mean", "IS", "{:.3f}"),
    ("is_std", "IS std", "{:.3f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("label_accuracy", "label acc.", "{:.3f}"),
)


@dataclass
class ExtractorOptions:
    """Options shared by `sweep` and `evaluate`: the feature network and the real images."""

    evaluator: str | None = option(
        None,
        "cfdg evaluator (.safetensors from `cfdg train-evaluator`); none uses the cached "
        "evaluator of the model's data set, $CFDG_CACHE/evaluators/DATA.safetensors",
        metavar="PATH",
    )
    inception_weights: str | None = option(
        None,
        "local Inception-v3 FID weights file (torch-fidelity's weights-inception-2015-12-05-"
        "6726825d.pth); replaces the evaluator, needs torch-fidelity; never downloaded",
        metavar="PATH",
    )
    reference: str | None = option(
        None,
        "real images: a data set name or path, an image .npz, or a stats .safetensors; "
        "none uses the model's data set",
        metavar="DATA",
    )
    reference_split: str = option(
        "test", "split of the reference data set", choices=("train", "test")
    )
    data_dir: str | None = option(None, "folder of the Fashion-MNIST IDX files", metavar="DIR")
    reference_cache: str | None = option(
        None,
        "cache folder for reference statistics; none uses $CFDG_CACHE or ~/.cache/cfdg",
        metavar="DIR",
    )
    is_splits: int = option(10, "splits of the Inception Score")
    nearest_k: int = option(5, "k of the k-nearest-neighbour precision/recall")
    pr_max_samples: int = option(
        10000, "at most this many images per set enter precision/recall (memory ~ its square)"
    )
    batch_size: int = option(256, "images per network batch (sampling and feature extraction)")
    device: str = option("auto", "device: auto, cpu, cuda or cuda:N")


def check_extractor_options(options: ExtractorOptions) -> None:
    """Raise UserError for metric options that would give wrong numbers or fail after sampling."""
    checks = {
        "is-splits": options.is_splits,
        "nearest-k": options.nearest_k,
        "pr-max-samples": options.pr_max_samples,
        "batch-size": options.batch_size,
    }
    for name, value in checks.items():
        if value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")


@dataclass
class SweepConfig(ExtractorOptions):
    """Settings of `cfdg sweep`."""

    checkpoint: str = option("", "run directory or checkpoint folder", cli=False)
    out: str = option("sweep", "output folder", metavar="DIR")
    w: str = option(DEFAULT_W, "guidance weights, comma-separated", metavar="LIST")
    num_samples: int = option(10000, "samples per w (the paper uses 50000)")
    steps: int = option(256, "sampling steps T (network evaluations per image)")
    v: float = option(0.3, "variance interpolation v in [0, 1] of the reverse step")
    clip: bool = option(True, "clip the predicted x to [-1, 1] at every step")
    seed: int = option(0, "seed of image 0; image i uses seed + i for every w")
    ema: bool = option(True, "use the EMA weights (--no-ema for the online weights)")
    grid_size: int = option(64, "images per sample grid (0: no grids)")
    grid_classes: str = option(
        "0", "class ids or names of the single-class grids, comma-separated", metavar="LIST"
    )


def w_tag(w: float) -> str:
    """Return the file-name form of a guidance weight: 0 -> '0', 0.1 -> '0.1', -1 -> 'm1'."""
    return f"{w:g}".replace("-", "m")


def load_extractor(options: ExtractorOptions, dataset: str | None, device: torch.device) -> Any:
    """Return the Inception extractor, the given evaluator, or the cached one of `dataset`.

    Raises:
        UserError: if no evaluator is given and none was trained for `dataset`.
    """
    if options.inception_weights:
        from cfdg.evaluation.inception import InceptionExtractor

        return InceptionExtractor(options.inception_weights, device=device)
    if options.evaluator:
        return load_evaluator(options.evaluator, device=device)
    if dataset is None:
        raise UserError("no evaluator given: pass --evaluator PATH or --inception-weights PATH")
    path = default_evaluator_path(dataset)
    if not path.is_file():
        raise UserError(
            f"no evaluator for data set {dataset!r} at {path}; run `cfdg train-evaluator "
            f"--data {dataset}` first, or pass --evaluator PATH"
        )
    return load_evaluator(path, device=device)


def check_extractor_fits(extractor: Any, info: dict[str, Any]) -> None:
    """Raise UserError unless a cfdg evaluator matches the model's channels and classes."""
    if getattr(extractor, "kind", "") != "cfdg-evaluator":
        return
    channels = info["image_shape"][0]
    extractor.check_images(torch.zeros((1, channels, 1, 1), dtype=torch.uint8))
    if extractor.num_classes != info["num_classes"]:
        raise UserError(
            f"the evaluator knows {extractor.num_classes} classes but the model has "
            f"{info['num_classes']}; train an evaluator on the model's data set"
        )
    trained_on = extractor.metadata.get("dataset")
    if trained_on and info.get("dataset") and trained_on != info["dataset"]:
        log.warning("evaluator trained on %s, model on %s", trained_on, info["dataset"])


def _parse_settings(config: SweepConfig, num_classes: int, class_names: list[str]):
    """Check the numeric options before any work and return (w values, grid class ids)."""
    from cfdg.cli.common import parse_classes, parse_floats

    check_extractor_options(config)
    weights = parse_floats(config.w, "w")
    if len(set(weights)) != len(weights):
        raise UserError(f"--w lists a value twice: {config.w}")
    minimum = max(config.is_splits, config.nearest_k + 1, 2)
    if config.num_samples < minimum:
        raise UserError(
            f"--num-samples {config.num_samples} is too small: IS with {config.is_splits} splits "
            f"and k={config.nearest_k} precision/recall need at least {minimum}"
        )
    checks = [
        (config.steps >= 2, f"--steps must be at least 2, got {config.steps}"),
        (0.0 <= config.v <= 1.0, f"--v must lie in [0, 1], got {config.v}"),
        (config.batch_size >= 1, f"--batch-size must be positive, got {config.batch_size}"),
        (config.grid_size >= 0, f"--grid-size must be 0 or more, got {config.grid_size}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    classes = parse_classes(config.grid_classes, class_names) if config.grid_size else []
    return weights, classes


def _sample_distributed(
    model,
    labels: torch.Tensor,
    seeds: list[int],
    w: float,
    config: SweepConfig,
    info: dict[str, Any],
    dist_info,
    progress: bool | None,
) -> torch.Tensor:
    """Sample this rank's contiguous slice of (labels, seeds) and gather uint8 [N, C, H, W]."""
    from cfdg import distributed
    from cfdg.images import to_uint8
    from cfdg.samplers import sample_in_batches

    n, world, rank = labels.shape[0], dist_info.world_size, dist_info.rank
    start, stop = rank * n // world, (rank + 1) * n // world
    shape = tuple(info["image_shape"])
    local = torch.empty((0, *shape), dtype=torch.uint8)
    if stop > start:
        images = sample_in_batches(
            model,
            labels[start:stop].to(dist_info.device),
            w,
            batch_size=config.batch_size,
            seed=seeds[start:stop],
            progress=progress if dist_info.is_main else False,
            steps=config.steps,
            v=config.v,
            clip=config.clip,
            logsnr_min=info.get("logsnr_min", -20.0),
            logsnr_max=info.get("logsnr_max", 20.0),
        )
        local = to_uint8(images)
    return distributed.all_gather_cat(local.to(dist_info.device)).cpu()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def saved_rows(out: Path, settings: dict[str, Any]) -> dict[float, dict[str, Any]]:
    """Return the rows of `out/metrics.json` by w, after checking they match `settings`.

    Raises:
        UserError: if the folder contains a sweep with other settings.
    """
    rows = _read_json(out / "metrics.json") if (out / "metrics.json").is_file() else []
    if not isinstance(rows, list):
        raise UserError(f"{out / 'metrics.json'} is not a list of sweep rows; use another --out")
    for row in rows:
        differ = [key for key in RESUME_KEYS if row.get(key) != settings.get(key)]
        if differ:
            changes = ", ".join(f"{k}={row.get(k)!r} (now {settings.get(k)!r})" for k in differ)
            raise UserError(
                f"{out} contains a sweep with other settings: {changes}; use another --out or "
                "delete the folder"
            )
    return {float(row["w"]): row for row in rows}


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    """Write metrics.json, metrics.csv and metrics.md for rows sorted by w."""
    rows = sorted(rows, key=lambda row: row["w"])
    _write_text(out / "metrics.json", json.dumps(rows, indent=2, default=str) + "\n")

    # CSV: the union of the row keys, in their first-seen order (JSON keeps it on resume).
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    _write_text(out / "metrics.csv", buffer.getvalue())
    _write_text(out / "metrics.md", markdown_table(rows))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Return a Markdown table of the main metrics per w, headed by the shared settings."""
    if not rows:
        return "No results yet.\n"
    first = rows[0]
    lines = [
        f"Guidance sweep of `{first['checkpoint']}` (step {first.get('checkpoint_step')}): "
        f"N = {first['num_samples']} samples per w, T = {first['steps']} steps, "
        f"v = {first['v']:g}, seed {first['seed']}. Extractor {first['extractor_kind']} "
        f"{first['extractor_hash'][:12]} (layer {first['extractor_layer']}, input "
        f"{first['extractor_input_size']}), reference {first['reference_name']} "
        f"({first['num_reference']} images).",
        "",
        "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
        "|" + "|".join("---:" for _ in TABLE_COLUMNS) + "|",
    ]
    for row in rows:
        cells = []
        for key, _, fmt in TABLE_COLUMNS:
            value = row.get(key)
            cells.append("n/a" if value is None or value == "" else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _row(
    w: float, metrics: dict[str, Any], settings: dict[str, Any], seconds: dict[str, float]
) -> dict[str, Any]:
    """Flatten one w's metrics, settings and extractor record into a table row."""
    extractor = metrics["extractor"]
    return {
        "w": w,
        **{k: v for k, v in metrics.items() if k not in ("extractor", "reference")},
        **settings,
        "extractor_kind": extractor["kind"],
        "extractor_layer": extractor["layer"],
        "extractor_input_size": "x".join(str(s) for s in extractor["input_size"]),
        "reference_name": metrics["reference"].get("name"),
        "reference_split": metrics["reference"].get("split"),
        **{f"{name}_seconds": round(value, 2) for name, value in seconds.items()},
    }


def _grid_files(out: Path, w: float, classes: list[int]) -> list[Path]:
    tag = w_tag(w)
    names = [f"grid_w{tag}.png", f"grid_samples_w{tag}.npz"]
    return [out / name for name in names + [f"grid_class{c}_w{tag}.png" for c in classes]]


def _grids(model, w, classes, config, info, dist_info, out: Path, progress) -> None:
    """Sample this w's grids with seeds seed + j, save the PNGs and the images (.npz)."""
    from cfdg.images import save_grid, save_npz

    size, num_classes = config.grid_size, info["num_classes"]
    generator = torch.Generator().manual_seed(config.seed)
    random_labels = torch.randint(num_classes, (size,), generator=generator)
    class_labels = torch.tensor(classes, dtype=torch.int64).repeat_interleave(size)
    labels = torch.cat([random_labels, class_labels])
    seeds = [config.seed + j for j in range(size)] * (1 + len(classes))
    images = _sample_distributed(model, labels, seeds, w, config, info, dist_info, progress)
    if not dist_info.is_main:
        return
    names = info["class_names"]
    tag = w_tag(w)
    save_grid(
        images[:size],
        out / f"grid_w{tag}.png",
        labels=random_labels.tolist(),
        class_names=names,
        title=f"w = {w:g}, random classes",
    )
    for index, label in enumerate(classes):
        chunk = images[size * (index + 1) : size * (index + 2)]
        save_grid(chunk, out / f"grid_class{label}_w{tag}.png", title=f"w = {w:g}, {names[label]}")
    save_npz(out / f"grid_samples_w{tag}.npz", images, labels, {"w": w, "seed": config.seed})


def _class_grids(out: Path, weights: list[float], classes: list[int], size: int, names) -> None:
    """Write grid_class{c}.png: one row per w, the first 8 grid seeds of class c in each row."""
    from cfdg.images import load_npz, save_grid

    ncol, ordered = min(size, 8), sorted(weights)
    per_w = {w: load_npz(out / f"grid_samples_w{w_tag(w)}.npz")[0] for w in ordered}
    for index, label in enumerate(classes):
        offset = size * (index + 1)
        images = torch.cat([per_w[w][offset : offset + ncol] for w in ordered])
        save_grid(
            images,
            out / f"grid_class{label}.png",
            nrow=ncol,
            row_titles=[f"w={w:g}" for w in ordered],
            title=f"class {names[label]}, same seeds in every row",
        )


def _samples_for(w, model, labels, seeds, config, settings, info, dist_info, out, progress):
    """Return this w's uint8 samples on rank 0 (None elsewhere): saved if valid, else sampled."""
    from cfdg.images import load_npz, save_npz

    npz = out / f"samples_w{w_tag(w)}.npz"
    saved = _read_json(npz.with_suffix(".json")) if npz.is_file() else None
    if saved and saved.get("w") == w and all(saved.get(k) == settings[k] for k in SAMPLE_KEYS):
        log.info("w=%g: scoring the saved %s", w, npz)
        return load_npz(npz)[0] if dist_info.is_main else None
    images = _sample_distributed(model, labels, seeds, w, config, info, dist_info, progress)
    if dist_info.is_main:
        save_npz(npz, images, labels, {**settings, "w": w, "dataset": info.get("dataset")})
    return images


def run_sweep(config: SweepConfig, progress: bool | None = None) -> list[dict[str, Any]]:
    """Run the guidance sweep described by `config` and return one metrics row per w.

    Resumes from the rows and sample files already in `config.out` when their settings match.
    Under `torchrun` the sampling is split across ranks; every rank returns the same rows.

    Raises:
        UserError: for invalid options, a missing checkpoint or evaluator, or an output folder
            holding a sweep with other settings; all raised before sampling starts.
    """
    from cfdg import distributed
    from cfdg.checkpoint import load_model
    from cfdg.cli.common import resolve_device

    # 1. Load the model, the extractor and the reference; check every option.
    if not config.checkpoint:
        raise UserError("no checkpoint given: pass a run directory or checkpoint folder")
    device = resolve_device(config.device)
    dist_info = distributed.setup(str(device))
    model, info = load_model(config.checkpoint, ema=config.ema, map_location=dist_info.device)
    weights, classes = _parse_settings(config, info["num_classes"], info["class_names"])
    extractor = load_extractor(config, info.get("dataset"), dist_info.device)
    check_extractor_fits(extractor, info)
    source = config.reference or info.get("dataset")
    if not source:
        raise UserError(f"{info['path']} names no data set: pass --reference DATA")

    # Rank 0 alone extracts and caches the reference; the other ranks only sample.
    reference = None
    if dist_info.is_main:
        reference = reference_stats(
            extractor,
            source,
            config.reference_split,
            config.data_dir,
            config.reference_cache,
            config.batch_size,
            progress=progress,
        )
    reference_sha256 = _broadcast_from_main(
        [{"sha": reference.data.get("images_sha256") if reference else None}], dist_info
    )[0]["sha"]
    settings = {
        "checkpoint": str(Path(info["path"]).resolve()),
        "checkpoint_step": info.get("step"),
        "num_samples": config.num_samples,
        "steps": config.steps,
        "v": config.v,
        "clip": config.clip,
        "seed": config.seed,
        "ema": config.ema,
        "extractor_hash": extractor.hash,
        "reference_sha256": reference_sha256,
        "is_splits": config.is_splits,
        "nearest_k": config.nearest_k,
        "pr_max_samples": config.pr_max_samples,
    }

    # 2. Find what an earlier run already saved. Every rank reads the same files before rank 0
    # writes anything, so all ranks skip the same w values.
    out = Path(config.out)
    done = saved_rows(out, settings)
    distributed.barrier()
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
    labels = torch.arange(config.num_samples, dtype=torch.int64) % info["num_classes"]
    seeds = [config.seed + i for i in range(config.num_samples)]
    rows = dict(done)

    # 3. Sample, score and save each w in turn.
    for w in tqdm(weights, desc="sweep", unit="w", disable=tqdm_disable(progress)):
        grids_missing = config.grid_size > 0 and not all(
            path.is_file() for path in _grid_files(out, w, classes)
        )
        if w in done and not grids_missing:
            log.info("w=%g: kept from %s", w, out / "metrics.json")
            continue
        if w not in done:
            start = time.perf_counter()
            images = _samples_for(
                w, model, labels, seeds, config, settings, info, dist_info, out, progress
            )
            sample_seconds = time.perf_counter() - start
        if grids_missing:
            _grids(model, w, classes, config, info, dist_info, out, progress)
        if w not in done and dist_info.is_main:
            start = time.perf_counter()
            metrics = evaluate_images(
                extractor,
                images,
                labels,
                reference,
                config.batch_size,
                config.is_splits,
                config.nearest_k,
                config.pr_max_samples,
                config.seed,
            )
            seconds = {"sample": sample_seconds, "metric": time.perf_counter() - start}
            rows[w] = _row(w, metrics, settings, seconds)
            write_tables(list(rows.values()), out)
            _plot(list(rows.values()), out)
            _log_row(rows[w])
        distributed.barrier()

    # 4. Figure 3 layout: one class, one row per w, the same seeds in every row.
    if dist_info.is_main:
        write_tables(list(rows.values()), out)
        _plot(list(rows.values()), out)
        if config.grid_size and classes:
            _class_grids(out, weights, classes, config.grid_size, info["class_names"])
    result = _broadcast_from_main(sorted(rows.values(), key=lambda row: row["w"]), dist_info)
    return [row for row in result if row["w"] in weights]


def _broadcast_from_main(rows: list[dict[str, Any]], dist_info) -> list[dict[str, Any]]:
    """Give every rank rank 0's list of dicts (other ranks never compute metrics)."""
    from cfdg import distributed

    if not distributed.is_initialized() or dist_info.world_size == 1:
        return rows
    import torch.distributed as dist

    payload = [rows if dist_info.is_main else None]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def _log_row(row: dict[str, Any]) -> None:
    log.info(
        "w=%g: FID %.3f, IS %.3f +- %.3f, precision %.3f, recall %.3f, label accuracy %s "
        "(%.0f s sampling, %.0f s metrics)",
        row["w"],
        row["fid"],
        row["is_mean"],
        row["is_std"],
        row["precision"],
        row["recall"],
        "n/a" if row["label_accuracy"] is None else f"{row['label_accuracy']:.3f}",
        row["sample_seconds"],
        row["metric_seconds"],
    )


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    from cfdg.evaluation.plots import plot_fid_is_vs_w, plot_fid_vs_is

    rows = sorted(rows, key=lambda row: row["w"])
    if rows:
        plot_fid_vs_is(rows, out / "fid_vs_is.png")
        plot_fid_is_vs_w(rows, out / "fid_is_vs_w.png")
