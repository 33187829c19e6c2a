"""FID, Inception Score, precision/recall and label accuracy from extracted features.

The arithmetic comes from maintained libraries: torchmetrics 1.9 (`FrechetInceptionDistance`,
`InceptionScore`, fed with precomputed features through a pass-through module) and `prdc`
(Naeem et al., 2020, arXiv:2002.09797: precision, recall, density, coverage with k nearest
neighbours). This module only prepares their inputs so that the known pitfalls cannot occur:

- Every image goes through the same uint8 quantisation (`cfdg.images.to_uint8`) and the same
  resize inside the extractor, real or generated.
- Every image is counted: features are extracted in batches that include the short last batch.
- The Inception Score does not depend on sample order. The logits are put in a canonical
  (lexicographic) order, then torchmetrics' random split permutation runs under a fixed seed
  in a forked RNG, which leaves the global torch RNG untouched.

Shapes: N samples, M reference images, D feature size, K classes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from cfdg.errors import UserError

log = logging.getLogger(__name__)


class _PassThrough(nn.Module):
    """Identity "feature network" so that torchmetrics accepts precomputed features [N, D]."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """Return the Frechet distance between Gaussians fitted to two feature sets.

    Computed by torchmetrics' `FrechetInceptionDistance` in float64.

    Args:
        real_features: [M, D] reference features, M >= 2.
        fake_features: [N, D] sample features, N >= 2.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real_features.shape[0] < 2 or fake_features.shape[0] < 2:
        raise UserError(
            f"FID needs at least 2 images per set, got {real_features.shape[0]} reference and "
            f"{fake_features.shape[0]} samples"
        )
    if real_features.shape[1] != fake_features.shape[1]:
        raise ValueError(
            f"feature sizes differ: {real_features.shape[1]} vs {fake_features.shape[1]}"
        )
    # sync_on_compute=False: under torchrun only rank 0 scores, so there is nothing to gather.
    metric = FrechetInceptionDistance(
        feature=_PassThrough(real_features.shape[1]), sync_on_compute=False
    )
    metric.update(real_features.double(), real=True)
    metric.update(fake_features.double(), real=False)
    return float(metric.compute())


def canonical_order(rows: torch.Tensor) -> torch.Tensor:
    """Return the indices that sort rows [N, K] lexicographically (first column first)."""
    array = rows.detach().cpu().double().numpy()
    return torch.from_numpy(np.lexsort(array.T[::-1]).copy())


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Return the Inception Score (mean, std over `splits`) of class logits [N, K].

    The result depends on the set of rows, never on their order (see the module docstring).

    Raises:
        UserError: if there are fewer samples than splits.
    """
    from torchmetrics.image.inception import InceptionScore

    if logits.shape[0] < splits:
        raise UserError(
            f"the Inception Score with {splits} splits needs at least {splits} samples, got "
            f"{logits.shape[0]}; sample more images or lower --is-splits"
        )
    logits = logits.double()[canonical_order(logits)]
    with warnings.catch_warnings():
        # torchmetrics warns that it keeps all features in memory, which is what we want here.
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(
            feature=_PassThrough(logits.shape[1]), splits=splits, sync_on_compute=False
        )
    metric.update(logits)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def subsample(features: torch.Tensor, max_count: int | None, seed: int) -> torch.Tensor:
    """Return at most `max_count` rows of [N, D], drawn without replacement with `seed`."""
    if max_count is None or features.shape[0] <= max_count:
        return features
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(features.shape[0], generator=generator)[:max_count]
    return features[index.sort().values]


def precision_recall(
    real_features: torch.Tensor,
    fake_features: torch.Tensor,
    nearest_k: int = 5,
    max_samples: int | None = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """Return precision, recall, density and coverage (prdc, k nearest neighbours).

    prdc builds full pairwise distance matrices, so each set is capped at `max_samples` rows
    (a seeded random subset) to bound memory at about 3 * max_samples^2 * 4 bytes.

    Args:
        real_features: [M, D] reference features.
        fake_features: [N, D] sample features.
        nearest_k: k of the k-NN radius.
        max_samples: Maximum rows used from each set; None uses all.
    """
    from prdc import compute_prdc

    if min(real_features.shape[0], fake_features.shape[0]) <= nearest_k:
        raise UserError(
            f"precision/recall with k={nearest_k} needs more than {nearest_k} images per set, got "
            f"{real_features.shape[0]} reference and {fake_features.shape[0]} samples"
        )
    real = subsample(real_features, max_samples, seed).float().numpy()
    fake = subsample(fake_features, max_samples, seed + 1).float().numpy()
    # prdc prints the set sizes to stdout; keep library output in the log instead.
    with contextlib.redirect_stdout(io.StringIO()):
        result = compute_prdc(real_features=real, fake_features=fake, nearest_k=nearest_k)
    return {name: float(value) for name, value in result.items()}


def label_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Return the fraction of samples whose argmax class [N, K] -> [N] equals `labels` [N]."""
    return (logits.argmax(dim=1).cpu() == labels.cpu()).double().mean().item()


def score_features(
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    reference_features: torch.Tensor,
    is_splits: int = 10,
    nearest_k: int = 5,
    pr_max_samples: int | None = 10_000,
    seed: int = 0,
) -> dict[str, Any]:
    """Compute every metric from sample features [N, D], logits [N, K] and reference [M, D].

    Args:
        labels: Conditioning labels [N] or None; label accuracy is reported only when given.

    Returns:
        A dict with fid, is_mean, is_std, precision, recall, density, coverage,
        label_accuracy (None without labels), num_samples and num_reference.
    """
    fid = frechet_distance(reference_features, features)
    is_mean, is_std = inception_score(logits, is_splits, seed)
    prdc = precision_recall(reference_features, features, nearest_k, pr_max_samples, seed)
    accuracy = None
    if labels is not None:
        accuracy = label_accuracy(logits, labels)
    record = {
        "fid": fid,
        "is_mean": is_mean,
        "is_std": is_std,
        **prdc,
        "label_accuracy": accuracy,
        "num_samples": int(features.shape[0]),
        "num_reference": int(reference_features.shape[0]),
    }
    if not all(math.isfinite(v) for v in (fid, is_mean, is_std)):
        log.warning("non-finite metric values: %s", record)
    return record


def evaluate_images(
    extractor: Any,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    reference: Any,
    batch_size: int = 256,
    is_splits: int = 10,
    nearest_k: int = 5,
    pr_max_samples: int | None = 10_000,
    seed: int = 0,
    progress: bool | None = False,
) -> dict[str, Any]:
    """Score uint8 images [N, C, H, W] against reference statistics with one extractor.

    Args:
        extractor: An `Evaluator` or `InceptionExtractor` (anything with `extract`, `hash`,
            `describe` and `num_classes`).
        labels: Conditioning labels [N] or None. Label accuracy needs the extractor to classify
            the same classes as the labels (the cfdg evaluator of that data set).
        reference: `ReferenceStats` computed with the same extractor.

    Raises:
        UserError: if the reference comes from another extractor, or labels are out of range.
    """
    reference.check_extractor(extractor)
    if labels is not None and labels.shape[0] != images.shape[0]:
        raise UserError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    features, logits = extractor.extract(images, batch_size=batch_size, progress=progress)
    use_labels = labels
    if labels is not None and getattr(extractor, "kind", "") != "cfdg-evaluator":
        log.info("label accuracy skipped: the %s extractor has other classes", extractor.kind)
        use_labels = None
    elif labels is not None and int(labels.max()) >= extractor.num_classes:
        raise UserError(
            f"labels reach {int(labels.max())} but the evaluator knows {extractor.num_classes} "
            "classes; use the evaluator of the data set the model was trained on"
        )
    record = score_features(
        features,
        logits,
        use_labels,
        reference.features,
        is_splits,
        nearest_k,
        pr_max_samples,
        seed,
    )
    record["extractor"] = extractor.describe()
    record["reference"] = reference.data
    return record
