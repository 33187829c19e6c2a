"""Classifier-free guidance: one guided prediction from conditional and unconditional ones.

eps_guided = (1 + w) eps(z, c) - w eps(z)   (Ho & Salimans 2021, Eq. 6)

`w` is the paper's guidance weight: w = 0 is plain conditional sampling, w = -1 is unconditional
sampling, and larger w trades diversity for fidelity. The null label id is `model.num_classes`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cfdg.errors import UserError

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def check_weight(w: float) -> float:
    """Return `w` as a float, or raise UserError when it is not a finite number."""
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise UserError(f"guidance weight w must be a finite number, got {w!r}")
    return float(w)


def classifier_free(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Return `(1 + w) * eps_cond - w * eps_uncond` over every channel (Eq. 6).

    Args:
        eps_cond: Conditional prediction eps(z, c), shape [N, C, H, W].
        eps_uncond: Unconditional prediction eps(z), same shape.
        w: Guidance weight, any finite float (negative values follow the same formula).

    Returns:
        The guided prediction, shape [N, C, H, W].
    """
    w = check_weight(w)
    if eps_cond.shape != eps_uncond.shape:
        raise UserError(
            f"eps_cond and eps_uncond must have one shape, got {tuple(eps_cond.shape)} "
            f"and {tuple(eps_uncond.shape)}"
        )
    return (1.0 + w) * eps_cond - w * eps_uncond


def guided_eps(
    model: Denoiser,
    z: torch.Tensor,
    logsnr: torch.Tensor,
    labels: torch.Tensor,
    w: float,
    null_label: int,
) -> torch.Tensor:
    """Evaluate the guided prediction of `model` at `(z, logsnr, labels)`.

    At w = 0 this is one network call on the N rows. Otherwise the conditional and unconditional
    predictions come from one batched call of 2N rows: the first N with `labels`, the last N with
    `null_label`.

    Args:
        z: Noisy images [N, C, H, W].
        logsnr: Log-SNR per image [N].
        labels: int64 class ids [N].
        null_label: The "no label" id, `model.num_classes`.

    Returns:
        Guided eps, shape [N, C, H, W], float32 or the model's output dtype.
    """
    if w == 0.0:
        return model(z, logsnr, labels)
    null = torch.full_like(labels, null_label)
    eps = model(torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([labels, null]))
    eps_cond, eps_uncond = eps.chunk(2)
    return classifier_free(eps_cond, eps_uncond, w)
