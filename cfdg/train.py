"""The training loop: AdamW with warmup, gradient clipping, EMA, bf16 autocast, checkpoints, DDP.

One optimizer step draws, for every image, a log-SNR lambda, the noise eps and the label dropout
(`cfdg.diffusion.training_losses`), all from a generator seeded by (seed, rank, step). The data
order is a function of (seed, epoch). So the state of a run is its weights, its optimizer state
and its step, and resuming from a checkpoint reproduces the uninterrupted run bit for bit.

Under `torchrun`, each rank trains on its own shard with its own draws, DDP averages the
gradients, and only rank 0 writes logs, samples and checkpoints.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cfdg import __version__, diffusion
from cfdg import config as cfg
from cfdg import distributed as dist_utils
from cfdg.checkpoint import latest_checkpoint, read_info, read_state, read_weights, save_checkpoint
from cfdg.data import BatchIterator, load_dataset
from cfdg.errors import UserError
from cfdg.nn.presets import PRESETS, get_preset
from cfdg.nn.unet import UNet
from cfdg.schedule import check_range, logsnr_from_uniform

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
# Fields that fix the network, the data or the random draws: a resumed run must keep them.
RESUME_FIXED = ("data", "image_size", "preset", "batch_size", "seed", "hflip")


@dataclass
class TrainConfig:
    data: str = cfg.option(
        "fashion-mnist",
        "data set: fashion-mnist, digits, a folder of class subfolders, a folder of "
        "downsampled-ImageNet .npz batches, or an .npz file of images and labels",
        metavar="NAME_OR_PATH",
    )
    data_dir: str | None = cfg.option(
        None,
        "folder of the Fashion-MNIST IDX files; none looks in /usr/share/datasets/fashion-mnist",
        metavar="DIR",
    )
    image_size: int | None = cfg.option(
        None, "resize images to this side length in pixels; none keeps the stored size"
    )
    preset: str = cfg.option(
        "cpu", f"network preset: {', '.join(PRESETS)}", choices=list(PRESETS), metavar="NAME"
    )
    out: str = cfg.option(
        "runs/train", "run directory for logs, samples and checkpoints", metavar="DIR"
    )
    batch_size: int | None = cfg.option(
        None, "images per optimizer step over all ranks; none takes the preset's (cpu: 128)"
    )
    lr: float | None = cfg.option(
        None,
        "peak AdamW learning rate; none takes the preset's (cpu and tiny: 2e-3; adm64: 3e-4 "
        "with batch 2048, as ADM trains ImageNet 64x64)",
    )
    weight_decay: float = cfg.option(0.0, "AdamW decoupled weight decay (ADM uses 0)")
    warmup_steps: int = cfg.option(200, "steps of linear learning-rate warmup from 0")
    grad_clip: float = cfg.option(
        1.0, "clip the global gradient norm to this value; 0 turns it off"
    )
    ema_decay: float = cfg.option(
        0.9999, "EMA decay; step s uses min(decay, (1 + s) / (10 + s)) so short runs benefit too"
    )
    p_uncond: float = cfg.option(0.1, "probability of training an image with the null label")
    logsnr_min: float = cfg.option(-20.0, "lowest log-SNR lambda of training and sampling")
    logsnr_max: float = cfg.option(20.0, "highest log-SNR lambda of training and sampling")
    max_steps: int = cfg.option(10000, "stop after this many optimizer steps in total")
    minutes: float | None = cfg.option(
        None, "wall-clock budget in minutes for this invocation; stop and checkpoint when spent"
    )
    log_every: int = cfg.option(50, "steps between log lines and metrics.jsonl records")
    sample_every: int = cfg.option(
        1000, "steps between sample grids (w = 1, EMA weights) in RUN_DIR/samples; 0 turns them off"
    )
    sample_steps: int = cfg.option(64, "sampling steps T of those grids")
    checkpoint_every: int = cfg.option(
        1000, "steps between checkpoints (one is also written at the end)"
    )
    keep_every: int = cfg.option(
        0, "also keep checkpoints at multiples of this many steps; 0 keeps only the newest"
    )
    precision: str = cfg.option(
        "auto",
        "fp32 or bf16 autocast; auto picks bf16 on CUDA and on CPUs with AVX-512 BF16, else fp32",
        choices=list(PRECISIONS),
        metavar="NAME",
    )
    compile: bool = cfg.option(False, "compile the network with torch.compile")
    seed: int = cfg.option(0, "seed of the initial weights, the data order and the noise draws")
    device: str = cfg.option("auto", "device: auto, cpu, cuda or cuda:N (under torchrun: per rank)")
    hflip: bool = cfg.option(False, "flip training images left-right at random")
    resume: bool = cfg.option(False, "continue from the newest checkpoint in the run directory")


class NonFiniteLossError(UserError):
    """The training loss became NaN or infinite."""


def validate_config(config: TrainConfig) -> None:
    """Check every value before any work starts.

    Raises:
        UserError: naming the option and the allowed values.
    """
    get_preset(config.preset)
    positive = {"max_steps": config.max_steps, "log_every": config.log_every}
    positive.update(sample_steps=config.sample_steps, checkpoint_every=config.checkpoint_every)
    for name, value in positive.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    non_negative = {"warmup_steps": config.warmup_steps, "sample_every": config.sample_every}
    non_negative.update(keep_every=config.keep_every, grad_clip=config.grad_clip)
    non_negative.update(weight_decay=config.weight_decay)
    for name, value in non_negative.items():
        if value < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or more, got {value}")
    if config.batch_size is not None and config.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {config.batch_size}")
    if config.lr is not None and not (config.lr > 0 and math.isfinite(config.lr)):
        raise UserError(f"--lr must be a positive number, got {config.lr}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {config.ema_decay}")
    if not 0.0 <= config.p_uncond <= 1.0:
        raise UserError(f"--p-uncond must be in [0, 1], got {config.p_uncond}")
    if not config.logsnr_min < config.logsnr_max:
        raise UserError(
            f"--logsnr-min ({config.logsnr_min}) must be below --logsnr-max ({config.logsnr_max})"
        )
    if config.minutes is not None and not config.minutes > 0:
        raise UserError(f"--minutes must be positive, got {config.minutes}")
    if config.precision not in PRECISIONS:
        raise UserError(
            f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision}"
        )
    if config.image_size is not None and config.image_size < 1:
        raise UserError(f"--image-size must be at least 1, got {config.image_size}")
    if not 0 <= config.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2**63), got {config.seed}")
    for name in ("grad_clip", "weight_decay"):
        if not math.isfinite(getattr(config, name)):
            raise UserError(
                f"--{name.replace('_', '-')} must be finite, got {getattr(config, name)}"
            )
    check_range(config.logsnr_min, config.logsnr_max)
    dist_utils.check_device(config.device)


def resolve_config(config: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill the preset's batch size and learning rate and the automatic precision."""
    preset = get_preset(config.preset)
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if bf16_is_fast(device) else "fp32"
    return dataclasses.replace(
        config,
        batch_size=config.batch_size or preset.batch_size,
        lr=config.lr if config.lr is not None else preset.lr,
        precision=precision,
        device=str(device),
    )


def bf16_is_fast(device: torch.device) -> bool:
    """Return whether bf16 autocast pays here: on CUDA with bf16, or a CPU with AVX-512 BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as file:
            return any("avx512_bf16" in line or "amx_bf16" in line for line in file)
    except OSError:
        return False


def _step_seed(seed: int, rank: int, step: int) -> int:
    """Return a distinct seed below 2**63 for the draws of each (seed, rank, step)."""
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % (2**63 - 1)


class LossWindow:
    """Sums of the loss over the steps since the last log, overall and per log-SNR quartile.

    Quartiles are those of the training distribution of lambda: bucket 0 contains the noisiest
    quarter (lambda below its 25th percentile), bucket 3 the cleanest.
    """

    def __init__(self, logsnr_min: float, logsnr_max: float, device: torch.device) -> None:
        u = torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64)
        self.edges = logsnr_from_uniform(u, logsnr_min, logsnr_max).float().to(device)
        self.sums = torch.zeros(11, dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, per_sample: torch.Tensor, logsnr: torch.Tensor, grad_norm: torch.Tensor) -> None:
        # sums: [loss sum, image count, 4 bucket sums, 4 bucket counts, grad-norm sum]
        per_sample = per_sample.detach().double()
        bucket = torch.bucketize(logsnr.detach().float(), self.edges)
        self.sums[0] += per_sample.sum()
        self.sums[1] += per_sample.numel()
        self.sums[2:6].index_add_(0, bucket, per_sample)
        self.sums[6:10].index_add_(0, bucket, torch.ones_like(per_sample))
        self.sums[10] += grad_norm.detach().double()
        self.steps += 1

    def reduce(self) -> dict[str, Any]:
        """All-reduce the sums across ranks and return the window means; then start a new window."""
        local_loss = (self.sums[0] / self.sums[1].clamp(min=1)).item()
        sums = self.sums.clone()
        if dist_utils.is_initialized():
            torch.distributed.all_reduce(sums)
        world = torch.distributed.get_world_size() if dist_utils.is_initialized() else 1
        values = sums.tolist()
        record = {
            "loss": values[0] / max(values[1], 1.0),
            **{
                f"loss_q{i}": values[2 + i] / values[6 + i] if values[6 + i] else None
                for i in range(4)
            },
            "grad_norm": values[10] / max(self.steps * world, 1),
        }
        if world > 1:
            record["loss_per_rank"] = _gather_floats(local_loss, self.sums.device)
        self.sums.zero_()
        self.steps = 0
        return record

    def is_finite(self) -> bool:
        """Return whether every rank's sums are finite (a collective call under DDP)."""
        finite = torch.isfinite(self.sums).all().to(torch.int32).reshape(1)
        if dist_utils.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        return bool(finite.item())


def _gather_floats(value: float, device: torch.device) -> list[float]:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    return dist_utils.all_gather_cat(tensor).tolist()


class StopRequest:
    """Turn SIGINT and SIGTERM into a flag read between steps; a second Ctrl-C stops at once."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading_is_main():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Trainer:
    """One training run: the networks, optimizer, data and run directory of `config`."""

    def __init__(self, config: TrainConfig) -> None:
        validate_config(config)
        self.dist = dist_utils.setup(None if config.device == "auto" else config.device)
        self.device = self.dist.device
        self.config = resolve_config(config, self.device)
        self.run_dir = Path(self.config.out)
        self.is_main = self.dist.is_main
        world = self.dist.world_size
        if self.config.batch_size % world:
            raise UserError(
                f"--batch-size {self.config.batch_size} must be a multiple of the {world} ranks"
            )
        self._check_run_dir()

        # Data: load and validate before building anything large.
        self.data = load_dataset(
            self.config.data, "train", self.config.data_dir, self.config.image_size
        )
        self.batches = BatchIterator(
            self.data,
            self.config.batch_size // world,
            seed=self.config.seed,
            rank=self.dist.rank,
            world_size=world,
            hflip=self.config.hflip,
            device=self.device,
        )

        # Networks: the online model trains; the EMA copy is what sampling uses.
        torch.manual_seed(self.config.seed)
        self.unet_kwargs = dict(get_preset(self.config.preset).unet)
        self.model = UNet(self.data.image_shape, self.data.num_classes, **self.unet_kwargs)
        self.model.to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.optimizer = make_optimizer(self.model, self.config)
        self.forward = self._wrap_for_training(self.model)
        self.step = 0
        self.saved_step: int | None = None
        # Why `run` ended: "max_steps", "minutes", or the name of the signal that stopped it.
        self.stop_reason: str | None = None
        self.generator = torch.Generator(device=self.device)
        self.window = LossWindow(self.config.logsnr_min, self.config.logsnr_max, self.device)
        if self.config.resume:
            self._resume()

    def _check_run_dir(self) -> None:
        has_checkpoint = latest_checkpoint(self.run_dir) is not None
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--out {self.run_dir} is a file, not a directory")
        if self.config.resume and not has_checkpoint:
            raise UserError(f"--resume: no checkpoint in {self.run_dir}/checkpoints to resume from")
        if has_checkpoint and not self.config.resume:
            raise UserError(
                f"{self.run_dir} already contains checkpoints: pass --resume to continue that run, "
                "or choose another --out"
            )

    def _wrap_for_training(self, model: nn.Module) -> nn.Module:
        wrapped = model
        if self.dist.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if self.config.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _resume(self) -> None:
        """Load weights, EMA, optimizer and data position of the newest checkpoint."""
        folder = latest_checkpoint(self.run_dir)
        saved = read_info(folder)["config"]
        for name in RESUME_FIXED:
            if saved.get(name) != getattr(self.config, name):
                raise UserError(
                    f"--resume: {name} is {getattr(self.config, name)!r} but the checkpoint in "
                    f"{folder} was trained with {saved.get(name)!r}; keep it unchanged"
                )
        self.model.load_state_dict(read_weights(folder, ema=False, map_location=self.device))
        self.ema.load_state_dict(read_weights(folder, ema=True, map_location=self.device))
        state = read_state(folder, map_location=self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.batches.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.saved_step = self.step
        log.info("resumed from %s at step %d", folder, self.step)

    # One optimizer step.

    def learning_rate(self, step: int) -> float:
        warmup = self.config.warmup_steps
        return self.config.lr * min(1.0, (step + 1) / warmup) if warmup else self.config.lr

    def train_step(self) -> None:
        """Draw a batch, take one AdamW step on the eps loss, update the EMA."""
        config = self.config
        images, labels = next(self.batches)
        step_seed = _step_seed(config.seed, self.dist.rank, self.step)
        self.generator.manual_seed(step_seed)
        torch.manual_seed(step_seed)  # Dropout draws from the global generator.

        # Forward and backward under autocast; the loss itself is computed in float32.
        self.model.train()
        with torch.autocast(self.device.type, torch.bfloat16, enabled=config.precision == "bf16"):
            out = diffusion.training_losses(
                self.forward,
                images,
                labels,
                null_label=self.data.num_classes,
                p_uncond=config.p_uncond,
                logsnr_min=config.logsnr_min,
                logsnr_max=config.logsnr_max,
                generator=self.generator,
            )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = clip_gradients(self.model, config.grad_clip)

        # Optimizer step with the warmed-up learning rate, then the EMA.
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.step)
        self.optimizer.step()
        self.step += 1
        update_ema(self.ema, self.model, min(config.ema_decay, (1 + self.step) / (10 + self.step)))
        self.window.add(out.per_sample, out.logsnr, grad_norm)

    # The loop.

    def run(self) -> Path:
        """Train until max_steps, the time budget or a signal; return the run directory."""
        config = self.config
        start = time.monotonic()
        deadline = start + config.minutes * 60 if config.minutes else None
        logger = MetricsLogger(self, start) if self.is_main else None
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save_json(self.resolved_dict(), self.run_dir / "config.json")
            log.info(
                "training %s (%.2fM parameters) on %s: %d images %s, %d classes, batch %d, %s, %s",
                config.preset,
                sum(p.numel() for p in self.model.parameters()) / 1e6,
                config.data,
                len(self.data),
                self.data.image_shape,
                self.data.num_classes,
                config.batch_size,
                config.precision,
                self.device,
            )

        reason = "max_steps"
        with StopRequest() as stop, _progress_bar(self, logger) as bar:
            while self.step < config.max_steps:
                self.train_step()
                bar.update(1)
                if self.step % config.log_every == 0:
                    self._log(logger, bar)
                if config.sample_every and self.step % config.sample_every == 0:
                    self.write_samples()
                if self.step % config.checkpoint_every == 0:
                    self.save()
                reason = self._stop_reason(stop, deadline)
                if reason:
                    break
            else:
                reason = "max_steps"

        # Close the run with a checkpoint of the last finite state, unless this step has one.
        if self.window.steps:
            self._log(logger, bar)
        if self.saved_step != self.step:
            self.save()
        self.stop_reason = reason
        if self.is_main:
            message = {
                "max_steps": f"reached step {self.step}",
                "minutes": f"time budget of {config.minutes} min spent at step {self.step}",
            }.get(reason, f"stopped by {reason} at step {self.step}")
            log.info("%s; checkpoint in %s (continue with --resume)", message, self.run_dir)
        dist_utils.barrier()
        return self.run_dir

    def _stop_reason(self, stop: StopRequest, deadline: float | None) -> str | None:
        """Agree across ranks whether to stop now (a signal or the deadline on any rank)."""
        local = 0
        if stop.signal_name:
            local = 2
        elif deadline is not None and time.monotonic() >= deadline:
            local = 1
        if dist_utils.is_initialized():
            flag = torch.tensor([local], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            local = int(flag.item())
        return {0: None, 1: "minutes", 2: stop.signal_name or "a signal on another rank"}[local]

    def _log(self, logger: MetricsLogger | None, bar: Any) -> None:
        self._check_finite()
        record = self.window.reduce()
        if logger is not None:
            logger.write(record, bar)

    def _check_finite(self) -> None:
        if self.window.is_finite():
            return
        last = latest_checkpoint(self.run_dir)
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
        raise NonFiniteLossError(
            f"training loss became non-finite (NaN or inf) by step {self.step}; stopped without "
            f"saving, {kept}. Try a lower --lr, --precision fp32 or a smaller --grad-clip"
        )

    # Outputs.

    def resolved_dict(self) -> dict[str, Any]:
        return {**cfg.to_dict(self.config), "world_size": self.dist.world_size}

    def info(self) -> dict[str, Any]:
        """JSON description stored with each checkpoint; `cfdg.checkpoint.load_model` reads it."""
        return {
            "format": "cfdg-checkpoint",
            "format_version": 1,
            "package_version": __version__,
            "dataset": self.data.name,
            "class_names": list(self.data.class_names),
            "num_classes": self.data.num_classes,
            "null_label": self.data.num_classes,
            "image_shape": list(self.data.image_shape),
            "preset": self.config.preset,
            "unet": {
                k: list(v) if isinstance(v, tuple) else v for k, v in self.unet_kwargs.items()
            },
            "logsnr_min": self.config.logsnr_min,
            "logsnr_max": self.config.logsnr_max,
            "config": self.resolved_dict(),
        }

    def save(self) -> Path | None:
        """Write a checkpoint on rank 0, after checking that the losses so far are finite."""
        self._check_finite()
        self.saved_step = self.step
        if not self.is_main:
            return None
        state = {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "data": self.batches.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "generator": self.generator.get_state().cpu()},
        }
        path = save_checkpoint(
            self.run_dir,
            self.step,
            self.model.state_dict(),
            self.ema.state_dict(),
            state,
            self.info(),
            keep_every=self.config.keep_every,
        )
        log.debug("wrote checkpoint %s", path)
        return path

    def write_samples(self) -> Path | None:
        """Sample a grid at w = 1 with the EMA weights into RUN_DIR/samples/step_XXXXXX.png."""
        if not self.is_main:
            return None
        from cfdg.images import save_grid
        from cfdg.samplers import sample

        classes = list(range(min(self.data.num_classes, 10)))
        rows = max(1, 40 // len(classes))
        labels = torch.tensor([c for _ in range(rows) for c in classes], dtype=torch.int64)
        images = sample(
            self.ema,
            labels,
            w=1.0,
            steps=self.config.sample_steps,
            seed=0,
            logsnr_min=self.config.logsnr_min,
            logsnr_max=self.config.logsnr_max,
            progress=False,
            device=self.device,
        )
        path = self.run_dir / "samples" / f"step_{self.step:06d}.png"
        title = f"step {self.step}, w = 1, T = {self.config.sample_steps}, EMA"
        save_grid(images, path, len(classes), labels.tolist(), self.data.class_names, title)
        return path


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with betas (0.9, 0.999); the fused kernel where this PyTorch has it."""
    kwargs = dict(lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), **kwargs)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to `max_norm` (0: only measure it); return the norm."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter and buffer."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - decay)
    for ema_buffer, buffer in zip(ema.buffers(), model.buffers(), strict=True):
        ema_buffer.copy_(buffer)


class MetricsLogger:
    """Writes the log line, RUN_DIR/metrics.jsonl and RUN_DIR/loss.csv on rank 0."""

    FIELDS = ["step", "total", "epoch", "loss", "loss_q0", "loss_q1", "loss_q2", "loss_q3"]
    FIELDS += ["grad_norm", "lr", "images_per_s", "elapsed_s", "eta_s"]

    def __init__(self, trainer: Trainer, start: float) -> None:
        self.trainer = trainer
        self.start = start
        self.last_time = start
        self.last_step = trainer.step
        self.first_step = trainer.step
        self.jsonl = trainer.run_dir / "metrics.jsonl"
        self.csv = trainer.run_dir / "loss.csv"

    def write(self, record: dict[str, Any], bar: Any) -> None:
        trainer, config = self.trainer, self.trainer.config
        now = time.monotonic()
        steps = trainer.step - self.last_step
        images_per_s = steps * config.batch_size / max(now - self.last_time, 1e-9)
        elapsed = now - self.start
        record = {
            "step": trainer.step,
            "total": config.max_steps,
            "epoch": trainer.batches.epoch,
            **record,
            "lr": trainer.learning_rate(trainer.step - 1),
            "images_per_s": images_per_s,
            "elapsed_s": elapsed,
            "eta_s": self._eta(elapsed, now),
        }
        self.last_time, self.last_step = now, trainer.step

        quartiles = " ".join(
            "-" if record[f"loss_q{i}"] is None else f"{record[f'loss_q{i}']:.3f}" for i in range(4)
        )
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        # Show the step budget only when it, not the time budget, ends the run.
        step_text = f"{record['step']}"
        if not config.minutes or record["eta_s"] >= self._steps_eta(elapsed) - 1e-9:
            step_text += f"/{record['total']}"
        log.info(
            "step %s loss %.4f (by lambda quartile %s) lr %.2e %.0f img/s elapsed %s eta %s",
            step_text,
            record["loss"],
            quartiles,
            record["lr"],
            images_per_s,
            _duration(elapsed),
            _duration(record["eta_s"]),
        )
        with open(self.jsonl, "a") as file:
            file.write(json.dumps(record) + "\n")
        new_csv = not self.csv.exists()
        with open(self.csv, "a", newline="") as file:
            writer = csv.DictWriter(file, self.FIELDS, extrasaction="ignore")
            if new_csv:
                writer.writeheader()
            writer.writerow(record)

    def _steps_eta(self, elapsed: float) -> float:
        """Return the seconds until max_steps at the mean rate of this invocation."""
        done = self.trainer.step - self.first_step
        rate = done / max(elapsed, 1e-9)
        return (self.trainer.config.max_steps - self.trainer.step) / rate if rate > 0 else math.inf

    def _eta(self, elapsed: float, now: float) -> float:
        config = self.trainer.config
        eta = self._steps_eta(elapsed)
        if config.minutes:
            eta = min(eta, max(0.0, config.minutes * 60 - elapsed))
        return eta


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@contextlib.contextmanager
def _progress_bar(trainer: Trainer, logger: MetricsLogger | None):
    from tqdm import tqdm

    show = logger is not None and sys.stderr.isatty() and os.environ.get("CFDG_PROGRESS") != "0"
    # Under a time budget the step count at the end is unknown, so the bar counts without a total.
    bar = tqdm(
        total=None if trainer.config.minutes else trainer.config.max_steps,
        initial=trainer.step,
        unit="step",
        dynamic_ncols=True,
        disable=not show,
    )
    try:
        yield bar
    finally:
        bar.close()


def train(config: TrainConfig) -> Path:
    """Train a class-conditional UNet as configured by `config`; return the run directory.

    Raises:
        UserError: for invalid options or data, before training starts.
        NonFiniteLossError: when the loss becomes NaN or infinite (no checkpoint is written
            after that point; the previous one stays).
    """
    return Trainer(config).run()
