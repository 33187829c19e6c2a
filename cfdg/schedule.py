"""Log-SNR noise schedule of the continuous-time variance-preserving diffusion.

Notation (Ho & Salimans, "Classifier-Free Diffusion Guidance", 2021, arXiv:2207.12598, Section 2):

| code                  | symbol              | definition                                 |
| --------------------- | ------------------- | ------------------------------------------ |
| `logsnr`              | lambda              | log(alpha^2 / sigma^2), in [-20, 20]       |
| `alpha`, `sigma`      | alpha, sigma        | alpha^2 = sigmoid(l), sigma^2 = sigmoid(-l) |
| `u`                   | u                   | uniform variable in [0, 1]                 |
| `logsnr_from_uniform` | -2 log tan(a u + b) | truncated hyperbolic secant map            |

The forms below stay finite in float32 at both ends: sigma^2 is computed as sigmoid(-lambda), never
as 1 - alpha^2, because 1 - sigmoid(20) rounds to 0 in float32 while sigmoid(-20) is about 2.06e-9.
"""

from __future__ import annotations

import math

import torch

from cfdg.errors import UserError

LOGSNR_MIN = -20.0
LOGSNR_MAX = 20.0
# Largest |lambda| accepted. sigma^2 = sigmoid(-lambda) underflows float32's normal range near
# lambda = 87, and the sampler's float64 step coefficients overflow exp() near 709.
LOGSNR_LIMIT = 50.0


def check_range(logsnr_min: float, logsnr_max: float) -> None:
    """Raise UserError unless `logsnr_min < logsnr_max` and both are finite."""
    if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max)):
        raise UserError(
            f"logsnr range must be finite, got [{logsnr_min}, {logsnr_max}]; "
            "Ho & Salimans use [-20, 20]"
        )
    if max(abs(logsnr_min), abs(logsnr_max)) > LOGSNR_LIMIT:
        raise UserError(
            f"logsnr range [{logsnr_min}, {logsnr_max}] is outside [-{LOGSNR_LIMIT:g}, "
            f"{LOGSNR_LIMIT:g}], beyond which float32 noise levels underflow; "
            "Ho & Salimans use [-20, 20]"
        )
    if not logsnr_min < logsnr_max:
        raise UserError(
            f"logsnr_min must be below logsnr_max, got {logsnr_min} >= {logsnr_max}; "
            "Ho & Salimans use -20 and 20"
        )


def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(alpha, sigma)` with the shape and dtype of `logsnr`.

    alpha^2 = sigmoid(lambda) and sigma^2 = sigmoid(-lambda), so alpha^2 + sigma^2 = 1 and
    log(alpha^2 / sigma^2) = lambda (Section 2, variance-preserving forward process).
    """
    logsnr = torch.as_tensor(logsnr)
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def log_alpha2_sigma2(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(log alpha^2, log sigma^2)` = (log sigmoid(lambda), log sigmoid(-lambda))."""
    logsnr = torch.as_tensor(logsnr)
    return torch.nn.functional.logsigmoid(logsnr), torch.nn.functional.logsigmoid(-logsnr)


def _secant_coefficients(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    """Return `(a, b)` of the map lambda = -2 log tan(a u + b), in float64."""
    b = math.atan(math.exp(-logsnr_max / 2))
    a = math.atan(math.exp(-logsnr_min / 2)) - b
    return a, b


def logsnr_from_uniform(
    u: torch.Tensor, logsnr_min: float = LOGSNR_MIN, logsnr_max: float = LOGSNR_MAX
) -> torch.Tensor:
    """Map uniform `u` in [0, 1] to lambda by lambda = -2 log tan(a u + b) (Section 2).

    b = arctan(exp(-lambda_max / 2)) and a = arctan(exp(-lambda_min / 2)) - b, so u = 0 gives
    lambda_max and u = 1 gives lambda_min. For uniform `u` this is a hyperbolic secant distribution
    truncated to [lambda_min, lambda_max], with density sech(lambda / 2) / (4 a).

    The map is evaluated in float64 and cast back to the dtype of `u`, then clamped to the range,
    because float32 rounding of a u + b near pi / 2 would leave values slightly outside it.
    """
    check_range(logsnr_min, logsnr_max)
    u = torch.as_tensor(u)
    a, b = _secant_coefficients(logsnr_min, logsnr_max)
    dtype = u.dtype if u.is_floating_point() else torch.get_default_dtype()
    if u.device.type == "mps":  # MPS has no float64, so compute on the CPU.
        logsnr = -2.0 * torch.log(torch.tan(a * u.cpu().double() + b))
        return logsnr.clamp(logsnr_min, logsnr_max).to(device=u.device, dtype=dtype)
    logsnr = -2.0 * torch.log(torch.tan(a * u.double() + b))
    return logsnr.clamp(logsnr_min, logsnr_max).to(dtype)


def sampling_grid(
    steps: int,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Return the increasing lambda grid lambda_1 = lambda_min < ... < lambda_T = lambda_max.

    The points are the training map at uniformly spaced u from 1 down to 0 (Section 2, "for finite
    timestep sampling"); both ends are set exactly.

    Returns:
        A 1-D tensor of length `steps`.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise UserError(f"steps must be an integer >= 2, got {steps!r}; Ho & Salimans use 256")
    u = torch.linspace(1.0, 0.0, steps, dtype=torch.float64)
    grid = logsnr_from_uniform(u, logsnr_min, logsnr_max)
    grid[0] = logsnr_min
    grid[-1] = logsnr_max
    return grid.to(dtype)
