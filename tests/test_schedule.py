"""Schedule math against float64 references written here, independent of cfdg.schedule."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from cfdg.errors import UserError
from cfdg.schedule import alpha_sigma, log_alpha2_sigma2, logsnr_from_uniform, sampling_grid

DENSE = np.linspace(-20.0, 20.0, 4001)


def ref_alpha2(logsnr):
    return 1.0 / (1.0 + np.exp(-np.asarray(logsnr, dtype=np.float64)))


def ref_sigma2(logsnr):
    return 1.0 / (1.0 + np.exp(np.asarray(logsnr, dtype=np.float64)))


def ref_map(u, lo=-20.0, hi=20.0):
    b = math.atan(math.exp(-hi / 2))
    a = math.atan(math.exp(-lo / 2)) - b
    return -2.0 * np.log(np.tan(a * np.asarray(u, dtype=np.float64) + b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_sigma_identities(dtype):
    logsnr = torch.tensor(DENSE, dtype=dtype)
    alpha, sigma = alpha_sigma(logsnr)
    assert alpha.dtype == dtype and sigma.dtype == dtype
    assert alpha.shape == logsnr.shape
    alpha2 = alpha.double().square().numpy()
    sigma2 = sigma.double().square().numpy()
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    np.testing.assert_allclose(alpha2 + sigma2, 1.0, atol=tol)
    # The log-ratio must hold to relative precision even where sigma^2 is about 2e-9.
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(np.log(alpha2 / sigma2), DENSE, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(alpha2, ref_alpha2(DENSE), rtol=rtol)
    np.testing.assert_allclose(sigma2, ref_sigma2(DENSE), rtol=rtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_sigma_ends_nonzero(dtype):
    alpha, sigma = alpha_sigma(torch.tensor([-20.0, 20.0], dtype=dtype))
    assert torch.isfinite(alpha).all() and torch.isfinite(sigma).all()
    # sigma^2 at lambda = 20 is about 2.06e-9, not the 0 that 1 - sigmoid(20) gives in float32.
    assert sigma[1].item() ** 2 == pytest.approx(ref_sigma2(20.0), rel=1e-5)
    assert sigma[1].item() ** 2 == pytest.approx(2.0611536e-9, rel=1e-5)
    assert alpha[0].item() ** 2 == pytest.approx(ref_alpha2(-20.0), rel=1e-5)


def test_log_alpha2_sigma2_reference():
    logsnr = torch.tensor(DENSE, dtype=torch.float64)
    log_alpha2, log_sigma2 = log_alpha2_sigma2(logsnr)
    # log sigmoid(x) = -log1p(exp(-x)) keeps full precision where sigmoid(x) is close to 1.
    np.testing.assert_allclose(log_alpha2.numpy(), -np.log1p(np.exp(-DENSE)), rtol=1e-12)
    np.testing.assert_allclose(log_sigma2.numpy(), -np.log1p(np.exp(DENSE)), rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_map_ends_and_monotone(dtype):
    u = torch.linspace(0.0, 1.0, 100001, dtype=dtype)
    logsnr = logsnr_from_uniform(u)
    assert logsnr.dtype == dtype
    assert logsnr[0].item() == pytest.approx(20.0, abs=1e-5)
    assert logsnr[-1].item() == pytest.approx(-20.0, abs=1e-5)
    assert logsnr.max().item() <= 20.0
    assert logsnr.min().item() >= -20.0
    assert (logsnr[1:] <= logsnr[:-1]).all(), "lambda must not increase with u"
    np.testing.assert_allclose(logsnr.double().numpy(), ref_map(u.double().numpy()), atol=1e-5)


def test_uniform_map_float32_random_in_range():
    u = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0))
    logsnr = logsnr_from_uniform(u)
    assert logsnr.dtype == torch.float32
    assert logsnr.min().item() >= -20.0
    assert logsnr.max().item() <= 20.0


def test_uniform_map_other_range():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    logsnr = logsnr_from_uniform(u, -5.0, 8.0)
    np.testing.assert_allclose(logsnr.numpy(), ref_map(u.numpy(), -5.0, 8.0), rtol=1e-12)
    assert logsnr[0].item() == pytest.approx(8.0, abs=1e-12)
    assert logsnr[-1].item() == pytest.approx(-5.0, abs=1e-12)


def test_uniform_map_density_histogram():
    """A 1e5-sample histogram matches the truncated sech density within sampling error."""
    n = 100_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    samples = logsnr_from_uniform(u).numpy()
    edges = np.linspace(-20.0, 20.0, 41)
    counts, _ = np.histogram(samples, bins=edges)
    # Analytic CDF: P(lambda <= x) = 1 - (arctan(exp(-x / 2)) - b) / a.
    b = math.atan(math.exp(-10.0))
    a = math.atan(math.exp(10.0)) - b
    cdf = 1.0 - (np.arctan(np.exp(-edges / 2.0)) - b) / a
    p = np.diff(cdf)
    expected = n * p
    std = np.sqrt(n * p * (1 - p))
    # 40 bins: a 4.5-sigma bound per bin fails by chance with probability below 3e-4 overall.
    assert np.all(np.abs(counts - expected) <= 4.5 * std + 1.0), (counts, expected)
    # The CDF used above integrates the density sech(lambda / 2) / (4 a) over each bin.
    density_mass = [
        quad(lambda x: 1.0 / np.cosh(x / 2.0) / (4.0 * a), lo, hi)[0]
        for lo, hi in zip(edges[:-1], edges[1:], strict=True)
    ]
    np.testing.assert_allclose(p, density_mass, rtol=1e-7)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("steps", [2, 3, 256])
@pytest.mark.parametrize("bounds", [(-20.0, 20.0), (-10.0, 5.0), (-3.0, 12.0)])
def test_sampling_grid(steps, bounds):
    lo, hi = bounds
    grid = sampling_grid(steps, lo, hi)
    assert grid.shape == (steps,)
    assert grid.dtype == torch.float64
    assert grid[0].item() == lo
    assert grid[-1].item() == hi
    assert (grid[1:] > grid[:-1]).all()
    u = np.linspace(1.0, 0.0, steps)
    np.testing.assert_allclose(grid.numpy()[1:-1], ref_map(u, lo, hi)[1:-1], rtol=1e-12, atol=1e-12)


def test_sampling_grid_float32_ends_exact():
    grid = sampling_grid(256, dtype=torch.float32)
    assert grid.dtype == torch.float32
    assert grid[0].item() == -20.0
    assert grid[-1].item() == 20.0
    assert (grid[1:] > grid[:-1]).all()


@pytest.mark.parametrize("steps", [1, 0, -3, 2.5, True])
def test_sampling_grid_rejects_steps(steps):
    with pytest.raises(UserError, match="steps"):
        sampling_grid(steps)


@pytest.mark.parametrize(
    "bounds",
    [
        (5.0, 5.0),
        (3.0, -3.0),
        (float("nan"), 1.0),
        (-float("inf"), 1.0),
        (-800.0, 20.0),
        (-20.0, 1e300),
    ],
)
def test_range_rejected(bounds):
    with pytest.raises(UserError, match="logsnr"):
        sampling_grid(10, *bounds)
