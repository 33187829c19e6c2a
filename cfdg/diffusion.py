"""Forward process, label dropout and the epsilon-prediction loss (Ho & Salimans 2021, Section 2).

| code         | symbol              | meaning                                                   |
| ------------ | ------------------- | --------------------------------------------------------- |
| `x`          | x                   | clean images in [-1, 1], [N, C, H, W]                     |
| `logsnr`     | lambda              | log-SNR per image, [N]                                    |
| `eps`        | epsilon             | standard normal noise, [N, C, H, W]                       |
| `z`          | z_lambda            | alpha_lambda x + sigma_lambda epsilon                     |
| `p_uncond`   | p_uncond            | probability of replacing a label with the null label      |
| `null_label` | the null token      | `num_classes`, the extra row of the class embedding       |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cfdg.errors import UserError
from cfdg.schedule import LOGSNR_MAX, LOGSNR_MIN, alpha_sigma, logsnr_from_uniform


@dataclass
class LossOutput:
    """Result of one training-loss evaluation.

    Attributes:
        loss: Scalar mean of `per_sample`, the value to backpropagate.
        per_sample: Mean squared error per image over its pixels, [N].
        logsnr: The lambda drawn for each image, [N].
        dropped: True where the label was replaced by the null label, [N].
    """

    loss: torch.Tensor
    per_sample: torch.Tensor
    logsnr: torch.Tensor
    dropped: torch.Tensor


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape [N] to [N, 1, 1, ...] so it broadcasts over the trailing dims of `like`."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def diffuse(x: torch.Tensor, logsnr: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Return z_lambda = alpha_lambda x + sigma_lambda eps, a draw from q(z_lambda | x) (Eq. 1).

    Args:
        x: Clean images [N, C, H, W].
        logsnr: Log-SNR per image [N].
        eps: Standard normal noise with the shape of `x`.
    """
    alpha, sigma = alpha_sigma(logsnr.to(x.dtype))
    return _expand(alpha, x) * x + _expand(sigma, x) * eps


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device):
    """Draw uniform values on the generator's device, then move them to `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def drop_labels(
    labels: torch.Tensor,
    p_uncond: float,
    null_label: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each label by `null_label` with probability `p_uncond`, one draw per sample.

    The caller's tensor is not modified.

    Args:
        labels: int64 class ids [N].
        p_uncond: Probability in [0, 1] (Ho & Salimans use 0.1).
        null_label: The "no label" id, `num_classes`.

    Returns:
        `(new_labels, dropped)`: int64 [N] labels and the boolean [N] mask of replaced rows.
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise UserError(f"p_uncond must be in [0, 1], got {p_uncond}; Ho & Salimans use 0.1")
    dropped = _rand((labels.shape[0],), generator, labels.device) < p_uncond
    return torch.where(dropped, torch.full_like(labels, null_label), labels), dropped


def sample_logsnr(
    n: int,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw n values of lambda = -2 log tan(a u + b), u ~ U[0, 1], as float32 [n]."""
    u = _rand((n,), generator, torch.device(device))
    return logsnr_from_uniform(u, logsnr_min, logsnr_max)


def training_losses(
    model,
    x: torch.Tensor,
    labels: torch.Tensor,
    null_label: int,
    p_uncond: float = 0.1,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
    generator: torch.Generator | None = None,
    logsnr: torch.Tensor | None = None,
) -> LossOutput:
    """Compute the epsilon-prediction loss E ||eps_theta(z_lambda, c) - eps||^2 (Eq. 5).

    Lambda, the noise and the label dropout are drawn once per sample here, and `model` is called
    once on the whole batch, so the conditional and unconditional model train jointly.

    Args:
        model: Network `model(z, logsnr, labels) -> eps` (may be wrapped in DDP).
        x: Clean images in [-1, 1], [N, C, H, W].
        labels: int64 class ids in [0, null_label), [N].
        null_label: The "no label" id, `num_classes`.
        p_uncond: Probability of training a sample unconditionally.
        generator: Optional generator for lambda, eps and dropout draws.
        logsnr: Optional fixed lambda per image [N], in place of the draw from p(lambda), for
            example to measure the loss at chosen noise levels.

    Returns:
        A `LossOutput`; the per-pixel mean is taken per sample, then over the batch.
    """
    n = x.shape[0]
    if labels.shape != (n,):
        raise UserError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if logsnr is None:
        logsnr = sample_logsnr(n, logsnr_min, logsnr_max, generator, x.device)
    elif logsnr.shape != (n,):
        raise UserError(f"logsnr must have shape [{n}], got {tuple(logsnr.shape)}")
    gen_device = generator.device if generator is not None else x.device
    eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
    model_labels, dropped = drop_labels(labels, p_uncond, null_label, generator)

    z = diffuse(x, logsnr, eps)
    eps_hat = model(z, logsnr, model_labels)
    per_sample = (eps_hat.float() - eps.float()).square().flatten(1).mean(dim=1)
    return LossOutput(loss=per_sample.mean(), per_sample=per_sample, logsnr=logsnr, dropped=dropped)
