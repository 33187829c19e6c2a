"""Guidance arithmetic against values computed by hand in float64."""

import math

import numpy as np
import pytest
import torch

from cfdg.errors import UserError
from cfdg.guidance import classifier_free, guided_eps


@pytest.mark.parametrize("w", [0.0, 0.1, 1.0, 3.0, -1.0, -0.5])
def test_classifier_free_values(w):
    rng = np.random.default_rng(0)
    cond = rng.standard_normal((2, 3, 4, 5))
    uncond = rng.standard_normal((2, 3, 4, 5))
    out = classifier_free(torch.from_numpy(cond), torch.from_numpy(uncond), w)
    assert out.shape == (2, 3, 4, 5)
    # Every element of every channel follows (1 + w) c - w u.
    expected = (1.0 + w) * cond - w * uncond
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-14)


def test_classifier_free_scalars_exact():
    cond = torch.tensor([2.0], dtype=torch.float64)
    uncond = torch.tensor([0.5], dtype=torch.float64)
    assert classifier_free(cond, uncond, 0.0).item() == 2.0
    assert classifier_free(cond, uncond, -1.0).item() == 0.5
    assert classifier_free(cond, uncond, 1.0).item() == 3.5
    assert classifier_free(cond, uncond, 4.0).item() == 8.0


def test_classifier_free_shape_mismatch():
    with pytest.raises(UserError, match="shape"):
        classifier_free(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4), 1.0)


@pytest.mark.parametrize("w", [math.nan, math.inf, "1", None, True])
def test_classifier_free_rejects_weight(w):
    with pytest.raises(UserError, match="guidance weight"):
        classifier_free(torch.zeros(1), torch.zeros(1), w)


class LabelShift:
    """eps = z + label: conditional and unconditional rows differ by a known amount."""

    num_classes = 4
    image_shape = (2, 2, 2)

    def __init__(self):
        self.calls = []

    def __call__(self, z, logsnr, labels):
        self.calls.append(labels.clone())
        return z + labels.to(z.dtype).reshape(-1, 1, 1, 1)


def test_guided_eps_batches_rows():
    model = LabelShift()
    z = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 3])
    out = guided_eps(model, z, torch.zeros(3), labels, 2.0, null_label=4)
    assert len(model.calls) == 1
    assert model.calls[0].tolist() == [0, 1, 3, 4, 4, 4]
    # (1 + 2)(z + c) - 2 (z + 4) = z + 3 c - 8.
    expected = z + 3.0 * labels.double().reshape(-1, 1, 1, 1) - 8.0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_guided_eps_zero_weight_one_call():
    model = LabelShift()
    z = torch.randn(3, 2, 2, 2)
    guided_eps(model, z, torch.zeros(3), torch.tensor([0, 1, 2]), 0.0, null_label=4)
    assert len(model.calls) == 1
    assert model.calls[0].tolist() == [0, 1, 2]
