"""Forward process, label dropout and loss, checked against float64 math written here."""

import math

import numpy as np
import pytest
import torch

from cfdg.diffusion import diffuse, drop_labels, sample_logsnr, training_losses
from cfdg.errors import UserError


def test_diffuse_reference():
    x = torch.linspace(-1, 1, 2 * 1 * 3 * 3, dtype=torch.float64).reshape(2, 1, 3, 3)
    eps = torch.randn(2, 1, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    logsnr = torch.tensor([-3.0, 7.0], dtype=torch.float64)
    z = diffuse(x, logsnr, eps)
    for i, lam in enumerate([-3.0, 7.0]):
        alpha = math.sqrt(1 / (1 + math.exp(-lam)))
        sigma = math.sqrt(1 / (1 + math.exp(lam)))
        np.testing.assert_allclose(z[i].numpy(), alpha * x[i].numpy() + sigma * eps[i].numpy())


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_labels_rate(p):
    n = 10_000
    labels = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    new, dropped = drop_labels(labels, p, 10, torch.Generator().manual_seed(1))
    count = int((new == 10).sum())
    assert count == int(dropped.sum())
    # Binomial(n, p): three standard deviations.
    assert abs(count - n * p) <= 3 * math.sqrt(n * p * (1 - p))
    # Kept rows keep their own label.
    assert torch.equal(new[~dropped], labels[~dropped])


def test_drop_labels_extremes():
    labels = torch.arange(100) % 7
    none, _ = drop_labels(labels, 0.0, 7)
    everything, _ = drop_labels(labels, 1.0, 7)
    assert torch.equal(none, labels)
    assert (everything == 7).all()


def test_drop_labels_leaves_input_and_varies():
    labels = torch.zeros(1000, dtype=torch.int64)
    before = labels.clone()
    gen = torch.Generator().manual_seed(3)
    counts = {int((drop_labels(labels, 0.1, 5, gen)[0] == 5).sum()) for _ in range(5)}
    assert torch.equal(labels, before)
    assert len(counts) > 1, "each call must make fresh per-sample draws"


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_drop_labels_rejects_probability(p):
    with pytest.raises(UserError, match="p_uncond"):
        drop_labels(torch.zeros(3, dtype=torch.int64), p, 3)


class Recorder:
    num_classes = 3
    image_shape = (1, 4, 4)

    def __init__(self):
        self.calls = []

    def __call__(self, z, logsnr, labels):
        self.calls.append((z.clone(), logsnr.clone(), labels.clone()))
        return 0.5 * z


def test_training_losses_reference():
    model = Recorder()
    x = torch.rand(64, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = 2 * x - 1
    labels = torch.arange(64) % 3
    out = training_losses(
        model, x, labels, null_label=3, p_uncond=0.5, generator=torch.Generator().manual_seed(1)
    )
    assert len(model.calls) == 1
    z, logsnr, model_labels = model.calls[0]
    assert torch.equal(model_labels == 3, out.dropped)
    assert torch.equal(labels, torch.arange(64) % 3)
    assert 0 < int(out.dropped.sum()) < 64

    # Recover eps from z, then rebuild the loss of Eq. 5 in float64.
    lam = logsnr.double().numpy()
    alpha = np.sqrt(1 / (1 + np.exp(-lam))).reshape(-1, 1, 1, 1)
    sigma = np.sqrt(1 / (1 + np.exp(lam))).reshape(-1, 1, 1, 1)
    eps = (z.numpy() - alpha * x.numpy()) / sigma
    per_sample = ((0.5 * z.numpy() - eps) ** 2).reshape(64, -1).mean(axis=1)
    np.testing.assert_allclose(out.per_sample.numpy(), per_sample, rtol=1e-6)
    assert out.loss.item() == pytest.approx(per_sample.mean(), rel=1e-6)
    assert out.loss.ndim == 0


def test_training_losses_finite_at_ends():
    model = Recorder()
    x = torch.full((2, 1, 4, 4), 0.9)
    out = training_losses(
        model, x, torch.tensor([0, 1]), null_label=3, logsnr=torch.tensor([-20.0, 20.0])
    )
    assert torch.isfinite(out.per_sample).all()
    z = model.calls[0][0]
    assert torch.isfinite(z).all()


def test_sample_logsnr_in_range_float32():
    logsnr = sample_logsnr(200_000, generator=torch.Generator().manual_seed(0))
    assert logsnr.dtype == torch.float32
    assert logsnr.min().item() >= -20.0
    assert logsnr.max().item() <= 20.0
