"""The guided ancestral sampler against a float64 re-derivation of Eq. 4 written here."""

import math

import numpy as np
import pytest
import torch

from cfdg.errors import UserError
from cfdg.samplers import SAMPLERS, sample

SHAPE = (1, 3, 3)


class StubModel:
    """A smooth, row-independent eps(z, lambda, c) that records every call."""

    num_classes = 3
    image_shape = SHAPE

    def __init__(self):
        self.calls = []

    def __call__(self, z, logsnr, labels):
        self.calls.append(labels.clone())
        shift = 0.05 * labels.to(z.dtype).reshape(-1, 1, 1, 1)
        return 0.7 * torch.tanh(z) + shift + 0.01 * logsnr.to(z.dtype).reshape(-1, 1, 1, 1)


def ref_eps(z, lam, label):
    return 0.7 * np.tanh(z) + 0.05 * label + 0.01 * lam


def ref_grid(steps, lo, hi):
    b = math.atan(math.exp(-hi / 2))
    a = math.atan(math.exp(-lo / 2)) - b
    u = np.linspace(1.0, 0.0, steps)
    grid = -2.0 * np.log(np.tan(a * u + b))
    grid[0], grid[-1] = lo, hi
    return grid


def ref_sample(label, seed, w, steps, v, clip, lo, hi, null=3):
    """Re-derive the sampler in float64: Eq. 4 with x_hat from Eq. 6's guided eps."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(SHAPE, generator=gen).double().numpy()
    grid = ref_grid(steps, lo, hi)
    trajectory = []

    def x_of(z, lam):
        alpha2 = 1 / (1 + np.exp(-lam))
        eps = (1 + w) * ref_eps(z, lam, label) - w * ref_eps(z, lam, null)
        x = (z - np.sqrt(1 - alpha2) * eps) / np.sqrt(alpha2)
        return np.clip(x, -1, 1) if clip else x

    for lam, lam_next in zip(grid[:-1], grid[1:], strict=True):
        x = x_of(z, lam)
        alpha2, alpha2_next = 1 / (1 + np.exp(-lam)), 1 / (1 + np.exp(-lam_next))
        sigma2, sigma2_next = 1 - alpha2, 1 - alpha2_next
        ratio = np.exp(lam - lam_next)
        mean = ratio * np.sqrt(alpha2_next / alpha2) * z + (1 - ratio) * np.sqrt(alpha2_next) * x
        var_tilde = (1 - ratio) * sigma2_next
        var_forward = (1 - ratio) * sigma2
        var = var_tilde ** (1 - v) * var_forward**v
        noise = torch.randn(SHAPE, generator=gen).double().numpy()
        z = mean + np.sqrt(var) * noise
        trajectory.append(z)
    return x_of(z, grid[-1]), trajectory


@pytest.mark.parametrize("v", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("w", [0.0, 1.5])
def test_steps_match_reference(v, clip, w):
    labels = torch.tensor([0, 2])
    steps, lo, hi = 4, -4.0, 6.0
    seen = []
    out = sample(
        StubModel(),
        labels,
        w,
        steps=steps,
        v=v,
        clip=clip,
        seed=11,
        logsnr_min=lo,
        logsnr_max=hi,
        callback=lambda i, z, x: seen.append(z.clone()),
    )
    assert len(seen) == steps - 1
    for row, label in enumerate([0, 2]):
        final, trajectory = ref_sample(label, 11 + row, w, steps, v, clip, lo, hi)
        for step, z_ref in enumerate(trajectory):
            np.testing.assert_allclose(
                seen[step][row].double().numpy(), z_ref, rtol=1e-5, atol=1e-5
            )
        np.testing.assert_allclose(out[row].double().numpy(), final, rtol=1e-5, atol=1e-5)
    if clip:
        assert out.abs().max().item() <= 1.0


def test_clipped_x_hat_enters_mean():
    """At lambda = -4 the raw x_hat leaves [-1, 1], so clipping changes the next z."""
    labels = torch.tensor([1])
    args = dict(steps=3, v=0.3, seed=5, logsnr_min=-4.0, logsnr_max=6.0)
    seen_clip, seen_raw = [], []
    sample(
        StubModel(), labels, 0.0, clip=True, callback=lambda i, z, x: seen_clip.append(z), **args
    )
    sample(
        StubModel(), labels, 0.0, clip=False, callback=lambda i, z, x: seen_raw.append(z), **args
    )
    assert not torch.allclose(seen_clip[0], seen_raw[0])


def test_full_range_finite_without_clipping():
    out = sample(StubModel(), torch.tensor([0, 1, 2, 3]), 3.0, steps=2, clip=False, seed=0)
    assert torch.isfinite(out).all()


def test_call_count_zero_weight():
    model = StubModel()
    sample(model, torch.tensor([0, 1, 2, 0, 1]), 0.0, steps=7, seed=0)
    assert len(model.calls) == 7
    for labels in model.calls:
        assert labels.shape == (5,)
        assert not (labels == 3).any(), "w = 0 must not evaluate null rows"


@pytest.mark.parametrize("w", [0.3, -1.0, 4.0])
def test_call_count_guided(w):
    model = StubModel()
    sample(model, torch.tensor([0, 1, 2, 0, 1]), w, steps=6, seed=0)
    assert len(model.calls) == 6
    for labels in model.calls:
        assert labels.shape == (10,)
        assert int((labels == 3).sum()) == 5
        assert labels[:5].tolist() == [0, 1, 2, 0, 1]


def test_batch_size_independence():
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 1, 2])
    batch = sample(StubModel(), labels, 1.0, steps=8, seed=100)
    for i in range(8):
        alone = sample(StubModel(), labels[i : i + 1], 1.0, steps=8, seed=[100 + i])
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=0)
    # Moving an image within the batch leaves it unchanged.
    order = torch.tensor([7, 3, 0, 1, 2, 4, 5, 6])
    permuted = sample(StubModel(), labels[order], 1.0, steps=8, seed=(100 + order).tolist())
    torch.testing.assert_close(permuted, batch[order], rtol=0, atol=0)


def test_seed_changes_images():
    labels = torch.tensor([0, 0])
    a = sample(StubModel(), labels, 0.0, steps=4, seed=0)
    b = sample(StubModel(), labels, 0.0, steps=4, seed=1)
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], b[0])


class PointData:
    """Exact eps for data concentrated on one image x0: eps = (z - alpha x0) / sigma."""

    num_classes = 2
    image_shape = SHAPE

    def __init__(self, x0):
        self.x0 = x0

    def __call__(self, z, logsnr, labels):
        alpha2 = torch.sigmoid(logsnr.double()).reshape(-1, 1, 1, 1)
        alpha, sigma = alpha2.sqrt(), (1 - alpha2).sqrt()
        return ((z.double() - alpha * self.x0) / sigma).float()


def test_point_data_lands_on_point():
    x0 = torch.linspace(-0.8, 0.8, 9, dtype=torch.float64).reshape(SHAPE)
    last = []
    out = sample(
        PointData(x0),
        torch.tensor([0, 1, 1]),
        2.0,
        steps=256,
        seed=0,
        callback=lambda i, z, x: last.append(z),
    )
    torch.testing.assert_close(out.double(), x0.expand(3, *SHAPE), rtol=0, atol=1e-5)
    # The last transition ends at lambda = 20, where z = alpha x0 + O(sigma), sigma about 4.5e-5.
    alpha_end = math.sqrt(1 / (1 + math.exp(-20.0)))
    torch.testing.assert_close(
        last[-1].double() / alpha_end, x0.expand(3, *SHAPE), rtol=0, atol=1e-3
    )


class GaussianData:
    """Exact eps for x ~ N(mu, s^2 I): eps = sigma (z - alpha mu) / (alpha^2 s^2 + sigma^2)."""

    num_classes = 1
    image_shape = (1, 2, 2)

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def __call__(self, z, logsnr, labels):
        alpha2 = torch.sigmoid(logsnr.double()).reshape(-1, 1, 1, 1)
        sigma2 = 1 - alpha2
        eps = sigma2.sqrt() * (z.double() - alpha2.sqrt() * self.mu)
        return (eps / (alpha2 * self.s**2 + sigma2)).float()


def test_gaussian_data_moments():
    """With the exact score, 256 steps reproduce the data mean and standard deviation."""
    mu, s = 0.2, 0.3
    n = 2000
    out = (
        sample(
            GaussianData(mu, s),
            torch.zeros(n, dtype=torch.int64),
            0.0,
            steps=256,
            clip=False,
            seed=0,
        )
        .double()
        .flatten()
    )
    values = out.numel()
    # Standard errors of the mean and of the standard deviation of `values` normal draws, plus
    # an allowance of 2% of s for the finite-step discretisation.
    assert abs(out.mean().item() - mu) <= 4 * s / math.sqrt(values) + 0.02 * s
    assert abs(out.std().item() - s) <= 4 * s / math.sqrt(2 * values) + 0.02 * s


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(labels=torch.tensor([0, 4])), "out of range"),
        (dict(labels=torch.tensor([-1])), "out of range"),
        (dict(labels=torch.tensor([0.0])), "int64"),
        (dict(labels=torch.tensor([[0]])), "1-D"),
        (dict(steps=1), "steps"),
        (dict(v=1.5), "v must"),
        (dict(v=-0.1), "v must"),
        (dict(w=float("nan")), "guidance weight"),
        (dict(seed=[1, 2, 3]), "seeds"),
        (dict(seed=2**63 - 1), "seed 9223372036854775808 is out of range"),
        (dict(seed=[0, -1]), "seed -1 is out of range"),
    ],
)
def test_rejects_bad_input(kwargs, match):
    model = StubModel()
    args = dict(labels=torch.tensor([0, 1]), w=1.0, steps=4)
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        sample(model, **args)
    assert model.calls == [], "validation must happen before any network call"


def test_null_labels_allowed():
    out = sample(StubModel(), torch.tensor([3, 3]), 0.0, steps=3)
    assert out.shape == (2, *SHAPE)


def test_registry_runs_each_sampler():
    for name, sampler in SAMPLERS.items():
        out = sampler(StubModel(), torch.tensor([0, 1]), 1.0, steps=3, seed=0)
        assert out.shape == (2, *SHAPE), name
        assert torch.isfinite(out).all(), name
