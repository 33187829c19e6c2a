"""Reverse-process samplers for log-SNR diffusion models with classifier-free guidance.

The ancestral sampler walks the increasing grid lambda_1 = lambda_min < ... < lambda_T = lambda_max
with the transition of Ho & Salimans (2021), Eq. 4. For a step lambda -> lambda' (lambda' > lambda):

| code          | symbol                   | definition                                     |
| ------------- | ------------------------ | ---------------------------------------------- |
| `r`           | e^(lambda - lambda')     | in (0, 1); `1 - r` is -expm1(lambda - lambda') |
| `x_hat`       | x_theta(z_lambda)        | (z - sigma eps_guided) / alpha, clipped or not |
| `mean`        | mu~(z_lambda, x_hat)     | r (alpha' / alpha) z + (1 - r) alpha' x_hat (Eq. 3) |
| `log_var`     | log variance of Eq. 4    | (1 - v) log sigma~^2 + v log sigma^2_(l / l')  |
|               | sigma~^2_(l' / l)        | (1 - r) sigma'^2 (Eq. 3)                       |
|               | sigma^2_(l / l')         | (1 - r) sigma^2 (Eq. 2)                        |

The step coefficients are computed in float64 from the grid and applied to float32 tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from cfdg.errors import UserError
from cfdg.guidance import check_weight, guided_eps
from cfdg.schedule import LOGSNR_MAX, LOGSNR_MIN, check_range, sampling_grid

log = logging.getLogger(__name__)

# Called after each transition as callback(step_index, z, x_hat); step_index counts from 0.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def model_device(model) -> torch.device:
    """Return the device of the model's first parameter, or the CPU for parameterless callables."""
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


def check_labels(labels: torch.Tensor, num_classes: int, allow_null: bool = True) -> None:
    """Raise UserError unless `labels` are int64 [N] in [0, num_classes) (or the null id)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64 or labels.ndim != 1:
        described = (
            f"{labels.dtype} tensor of shape {tuple(labels.shape)}"
            if isinstance(labels, torch.Tensor)
            else type(labels).__name__
        )
        raise UserError(f"labels must be a 1-D int64 tensor, got {described}")
    if labels.numel() == 0:
        raise UserError("labels is empty; pass at least one class id")
    high = num_classes if allow_null else num_classes - 1
    low_value, high_value = int(labels.min()), int(labels.max())
    if low_value < 0 or high_value > high:
        bad = low_value if low_value < 0 else high_value
        allowed = f"[0, {num_classes - 1}]" + (
            f" or the null id {num_classes}" if allow_null else ""
        )
        raise UserError(f"label {bad} is out of range; allowed class ids are {allowed}")


def _seed_list(seed: int | Sequence[int], n: int) -> list[int]:
    if isinstance(seed, bool):
        raise UserError(f"seed must be an int or a list of {n} ints, got {seed!r}")
    if isinstance(seed, int):
        seeds = [seed + i for i in range(n)]
    else:
        seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise UserError(f"got {len(seeds)} seeds for {n} labels; pass one seed per image or an int")
    # torch.Generator.manual_seed takes a signed 64-bit value.
    bad = [s for s in seeds if not 0 <= s < 2**63]
    if bad:
        raise UserError(f"seed {bad[0]} is out of range; image seeds must be in [0, 2**63)")
    return seeds


class _PerImageNoise:
    """Standard normal draws where row i comes from its own generator seeded with seeds[i]."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device: torch.device):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.shape = shape
        self.device = device

    def __call__(self) -> torch.Tensor:
        rows = [torch.randn(self.shape, generator=g) for g in self.generators]
        return torch.stack(rows).to(self.device)


def ancestral_step_coefficients(
    logsnr: float, logsnr_next: float, v: float
) -> tuple[float, float, float, float, float]:
    """Return float64 `(alpha, sigma, mean_z, mean_x, std)` of one step lambda -> lambda' (Eq. 4).

    With them, x_hat = (z - sigma eps) / alpha and z' = mean_z z + mean_x x_hat + std noise.
    """
    alpha = math.sqrt(1.0 / (1.0 + math.exp(-logsnr)))
    sigma = math.sqrt(1.0 / (1.0 + math.exp(logsnr)))
    alpha_next = math.sqrt(1.0 / (1.0 + math.exp(-logsnr_next)))
    log_sigma2 = -math.log1p(math.exp(logsnr))
    log_sigma2_next = -math.log1p(math.exp(logsnr_next))
    r = math.exp(logsnr - logsnr_next)
    one_minus_r = -math.expm1(logsnr - logsnr_next)
    # Eq. 4: (sigma~^2)^(1-v) (sigma^2_{lambda|lambda'})^v, in log space so that it stays finite.
    log_var = math.log(one_minus_r) + (1.0 - v) * log_sigma2_next + v * log_sigma2
    return alpha, sigma, r * alpha_next / alpha, one_minus_r * alpha_next, math.exp(0.5 * log_var)


@torch.no_grad()
def sample(
    model,
    labels: torch.Tensor,
    w: float,
    steps: int = 256,
    v: float = 0.3,
    clip: bool = True,
    seed: int | Sequence[int] = 0,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
    progress: bool | None = None,
    callback: StepCallback | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw images with the guided ancestral sampler of Ho & Salimans (2021), Eq. 4 and Eq. 6.

    Starts from z ~ N(0, I) at lambda_min, applies T - 1 transitions up the grid, and returns
    x_hat at lambda_max without added noise, so a T-step sample costs T network evaluations.

    Args:
        model: Network `model(z, logsnr, labels) -> eps` with `num_classes` and `image_shape`.
        labels: int64 class ids [N] in [0, num_classes); the null id num_classes gives
            unconditional samples.
        w: Guidance weight of Eq. 6 (0: conditional, -1: unconditional).
        steps: Grid length T >= 2.
        v: Variance interpolation in [0, 1] of Eq. 4 (Ho & Salimans use 0.3).
        clip: Clip x_hat to [-1, 1] before it enters the mean (and in the returned images).
        seed: An int (image i uses seed + i) or a list of N per-image seeds. Image i depends only on
            its seed, its label and the settings, not on the batch size or its place in the batch.
        progress: Show a tqdm bar; None shows it only on a terminal.
        callback: Optional `callback(step_index, z, x_hat)` after each transition.
        device: Where to run; defaults to the device of the model's parameters.

    Returns:
        float32 images [N, C, H, W] in [-1, 1] (when `clip`), on `device`.
    """
    # 1. Check every input before any network call.
    num_classes = int(model.num_classes)
    image_shape = tuple(int(d) for d in model.image_shape)
    check_labels(labels, num_classes)
    w = check_weight(w)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise UserError(f"v must be in [0, 1], got {v!r}; Ho & Salimans use 0.3")
    check_range(logsnr_min, logsnr_max)
    grid = sampling_grid(steps, logsnr_min, logsnr_max).tolist()
    seeds = _seed_list(seed, labels.shape[0])
    device = torch.device(device) if device is not None else model_device(model)
    labels = labels.to(device)

    # 2. Start from N(0, I) at lambda_min, with each image's noise from its own generator.
    noise = _PerImageNoise(seeds, image_shape, device)
    z = noise()
    n = z.shape[0]

    def predict_x(z: torch.Tensor, logsnr: float, alpha: float, sigma: float) -> torch.Tensor:
        logsnr_batch = torch.full((n,), logsnr, device=device, dtype=torch.float32)
        eps = guided_eps(model, z, logsnr_batch, labels, w, num_classes).float()
        x_hat = (z - sigma * eps) / alpha  # x_theta(z) = (z - sigma eps) / alpha
        return x_hat.clamp(-1.0, 1.0) if clip else x_hat

    # 3. Walk up the grid with the transition of Eq. 4.
    bar = tqdm(
        range(steps - 1),
        desc="sampling",
        unit="step",
        leave=False,
        disable=(None if progress is None else not progress),
    )
    for i in bar:
        alpha, sigma, mean_z, mean_x, std = ancestral_step_coefficients(grid[i], grid[i + 1], v)
        x_hat = predict_x(z, grid[i], alpha, sigma)
        z = mean_z * z + mean_x * x_hat + std * noise()
        if callback is not None:
            callback(i, z, x_hat)
    bar.close()

    # 4. Return x_hat at lambda_max with no added noise.
    alpha_end = math.sqrt(1.0 / (1.0 + math.exp(-grid[-1])))
    sigma_end = math.sqrt(1.0 / (1.0 + math.exp(grid[-1])))
    return predict_x(z, grid[-1], alpha_end, sigma_end)


# Sampler name -> function with the signature of `sample`, for the CLI and tests.
SAMPLERS = {"ancestral": sample}


def sample_in_batches(
    model,
    labels: torch.Tensor,
    w: float,
    batch_size: int = 256,
    seed: int | Sequence[int] = 0,
    progress: bool | None = None,
    **kwargs,
) -> torch.Tensor:
    """Run `sample` over `labels` in batches of at most `batch_size` images, on the CPU at the end.

    Image i still uses seed + i (or seed[i]), so the result equals one `sample` call on all labels.

    Returns:
        float32 images [N, C, H, W] on the CPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    seeds = _seed_list(seed, labels.shape[0])
    chunks = []
    bar = tqdm(
        total=labels.shape[0],
        desc=f"w={w:g}",
        unit="img",
        leave=False,
        disable=(None if progress is None else not progress),
    )
    for start in range(0, labels.shape[0], batch_size):
        stop = min(start + batch_size, labels.shape[0])
        images = sample(
            model, labels[start:stop], w, seed=seeds[start:stop], progress=False, **kwargs
        )
        chunks.append(images.cpu())
        bar.update(stop - start)
    bar.close()
    return torch.cat(chunks)
