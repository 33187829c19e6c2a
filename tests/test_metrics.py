"""FID, IS, precision/recall and the reference cache against float64 references written here."""

import sys

import numpy as np
import pytest
import scipy.linalg
import torch

from cfdg.errors import UserError
from cfdg.evaluation.extractor import Evaluator, EvaluatorNet
from cfdg.evaluation.metrics import (
    evaluate_images,
    frechet_distance,
    inception_score,
    label_accuracy,
    precision_recall,
)
from cfdg.evaluation.reference import ReferenceStats, reference_stats
from cfdg.images import save_npz, to_uint8


def random_evaluator(channels=1, size=(8, 8), num_classes=10, seed=0):
    torch.manual_seed(seed)
    net = EvaluatorNet(channels, num_classes, size)
    # Random batch-norm statistics, so the features are not all alike.
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return Evaluator(net, {"dataset": "random"})


def ref_fid(x, y):
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_x @ cov_y).real
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x + cov_y - 2 * covmean))


def ref_inception_score(logits):
    logits = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    marginal = p.mean(axis=0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(axis=1).mean()))


def test_fid_matches_scipy_reference():
    rng = np.random.default_rng(0)
    dim = 6
    a = rng.normal(size=(dim, dim))
    x = rng.normal(size=(400, dim)) @ a + 0.5
    y = rng.normal(size=(300, dim)) * np.linspace(0.5, 2.0, dim) - 0.2
    expected = ref_fid(x, y)
    got = frechet_distance(torch.from_numpy(x), torch.from_numpy(y))
    assert expected > 1.0
    assert got == pytest.approx(expected, rel=1e-7)


def test_fid_needs_two_images():
    with pytest.raises(UserError, match="at least 2"):
        frechet_distance(torch.zeros(1, 4), torch.randn(5, 4))


def test_fid_of_set_against_itself_is_zero(tmp_path):
    # Real images are stored as uint8; generated ones arrive as floats in [-1, 1] and go through
    # to_uint8. Both are 12x12 and resized to the extractor's 8x8 input, the same way.
    evaluator = random_evaluator(size=(8, 8))
    generated = torch.rand(60, 1, 12, 12) * 2 - 1
    real = to_uint8(generated)
    save_npz(tmp_path / "real.npz", real)
    reference = reference_stats(evaluator, str(tmp_path / "real.npz"), cache_dir=tmp_path)
    record = evaluate_images(evaluator, to_uint8(generated), None, reference, batch_size=16)
    assert abs(record["fid"]) < 1e-6
    assert record["precision"] == 1.0
    assert record["recall"] == 1.0
    assert record["label_accuracy"] is None


def test_extract_counts_every_image():
    evaluator = random_evaluator()
    images = torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8)
    features, logits = evaluator.extract(images, batch_size=16)
    whole, _ = evaluator.extract(images, batch_size=64)
    assert features.shape == (37, evaluator.net.num_features)
    assert logits.shape == (37, 10)
    torch.testing.assert_close(features, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # 37 samples, 128 features
def test_evaluate_counts_every_image(tmp_path):
    evaluator = random_evaluator()
    real = torch.randint(0, 256, (45, 1, 8, 8), dtype=torch.uint8)
    fake = torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8)
    save_npz(tmp_path / "real.npz", real)
    reference = reference_stats(
        evaluator, str(tmp_path / "real.npz"), batch_size=16, cache_dir=tmp_path
    )
    record = evaluate_images(evaluator, fake, None, reference, batch_size=16)
    features, _ = evaluator.extract(fake)
    assert reference.features.shape[0] == 45
    assert record["num_samples"] == 37
    assert record["num_reference"] == 45
    assert record["fid"] == pytest.approx(
        ref_fid(reference.features.double().numpy(), features.double().numpy()), rel=1e-4
    )


@pytest.mark.filterwarnings("ignore::UserWarning")  # torchmetrics: std of one split
def test_inception_score_one_split_matches_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(50, 7)) * 2
    mean, std = inception_score(torch.from_numpy(logits), splits=1)
    assert mean == pytest.approx(ref_inception_score(logits), rel=1e-10)
    assert std != std or std == 0.0  # one split: torchmetrics' std is NaN (n - 1 = 0)


def test_inception_score_ignores_sample_order():
    # Confident logits, class-sorted: a split of one class would score about 1.
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(10), 30)
    logits = rng.normal(size=(300, 10)) + 6.0 * np.eye(10)[labels]
    sorted_score = inception_score(torch.from_numpy(logits), splits=10)
    shuffled = logits[rng.permutation(300)]
    shuffled_score = inception_score(torch.from_numpy(shuffled), splits=10)
    assert sorted_score[0] == pytest.approx(shuffled_score[0], rel=1e-12)
    assert sorted_score[1] == pytest.approx(shuffled_score[1], rel=1e-12)
    # The splits are mixed, so each one scores near the whole-set value, far above 1.
    assert sorted_score[0] == pytest.approx(ref_inception_score(logits), rel=0.1)


def test_inception_score_keeps_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    inception_score(torch.randn(40, 5, generator=torch.Generator().manual_seed(0)), splits=4)
    assert torch.equal(torch.rand(3), expected)


def test_inception_score_needs_enough_samples():
    with pytest.raises(UserError, match="at least 10 samples"):
        inception_score(torch.randn(5, 3), splits=10)


def ref_precision_recall(real, fake, k):
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    cross = np.linalg.norm(real[:, None] - fake[None], axis=-1)  # [M, N]
    precision = (cross < radii(real)[:, None]).any(axis=0).mean()
    recall = (cross < radii(fake)[None, :]).any(axis=1).mean()
    return precision, recall


def test_precision_recall_matches_reference():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(60, 4))
    fake = rng.normal(size=(50, 4)) * 1.5 + 0.7
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), nearest_k=3)
    precision, recall = ref_precision_recall(real.astype(np.float32), fake.astype(np.float32), 3)
    assert got["precision"] == pytest.approx(precision, abs=1e-12)
    assert got["recall"] == pytest.approx(recall, abs=1e-12)
    assert 0.0 < got["precision"] < 1.0


def test_precision_recall_caps_samples():
    real = torch.randn(80, 3)
    fake = torch.randn(70, 3)
    capped = precision_recall(real, fake, nearest_k=3, max_samples=20)
    assert 0.0 <= capped["precision"] <= 1.0
    same = precision_recall(real, real, nearest_k=3, max_samples=None)
    assert same["precision"] == 1.0
    assert same["recall"] == 1.0


def test_label_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert label_accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75


def test_reference_rejects_other_extractor(tmp_path):
    first, second = random_evaluator(seed=0), random_evaluator(seed=1)
    assert first.hash != second.hash
    stats = ReferenceStats(torch.randn(20, first.net.num_features), first.describe(), {})
    stats.check_extractor(first)
    with pytest.raises(UserError, match="other|not"):
        stats.check_extractor(second)
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    with pytest.raises(UserError, match="extractor"):
        evaluate_images(second, images, None, stats)


def test_reference_cache_is_reused(tmp_path):
    evaluator = random_evaluator()
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    save_npz(tmp_path / "real.npz", images)
    first = reference_stats(evaluator, str(tmp_path / "real.npz"), cache_dir=tmp_path / "c")
    calls = []
    original = evaluator.extract
    evaluator.extract = lambda *a, **k: calls.append(1) or original(*a, **k)
    second = reference_stats(evaluator, str(tmp_path / "real.npz"), cache_dir=tmp_path / "c")
    assert first.path == second.path
    assert first.path.is_file()
    assert calls == []
    torch.testing.assert_close(first.features, second.features)
    # A stats file passed directly is checked against the extractor.
    other = random_evaluator(seed=5)
    with pytest.raises(UserError, match="extractor"):
        reference_stats(other, str(first.path))


def test_reference_cache_key_follows_images(tmp_path):
    evaluator = random_evaluator()
    images = torch.randint(0, 256, (30, 1, 8, 8), dtype=torch.uint8)
    save_npz(tmp_path / "real.npz", images)
    first = reference_stats(evaluator, str(tmp_path / "real.npz"), cache_dir=tmp_path)
    images[0, 0, 0, 0] ^= 1
    save_npz(tmp_path / "real.npz", images)
    second = reference_stats(evaluator, str(tmp_path / "real.npz"), cache_dir=tmp_path)
    assert first.path != second.path


def test_inception_needs_local_file(tmp_path):
    from cfdg.evaluation.inception import InceptionExtractor

    with pytest.raises(UserError, match="not found"):
        InceptionExtractor(tmp_path / "missing.pth")


def test_inception_without_torch_fidelity(tmp_path, monkeypatch):
    from cfdg.evaluation.inception import InceptionExtractor

    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"not real weights")
    # None in sys.modules makes the import fail, whether or not torch-fidelity is installed.
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    with pytest.raises(UserError, match="pip install torch-fidelity"):
        InceptionExtractor(weights)
