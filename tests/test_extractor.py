"""The built-in evaluator: training, shapes for any image size, storage, content hash, CLI."""

import json

import pytest
import torch

from cfdg.cli import main
from cfdg.data import load_dataset
from cfdg.errors import UserError
from cfdg.evaluation.extractor import (
    Evaluator,
    EvaluatorConfig,
    EvaluatorNet,
    accuracy,
    fit,
    load_evaluator,
    save_evaluator,
    weights_hash,
)


@pytest.fixture(scope="module")
def digits_evaluator():
    train = load_dataset("digits", "train")
    net = fit(train.images, train.labels, 10, EvaluatorConfig(epochs=6, batch_size=64), False)
    return Evaluator(net, {"dataset": "digits"})


def test_evaluator_learns_digits(digits_evaluator):
    test = load_dataset("digits", "test")
    # 360 test images: a 0.9 floor sits far below the ~0.97 reached, well beyond sampling noise.
    assert accuracy(digits_evaluator, test.images, test.labels) > 0.9


@pytest.mark.parametrize(
    ("shape", "input_size"),
    [
        ((1, 28, 28), (28, 28)),
        ((1, 8, 8), (8, 8)),
        ((3, 64, 64), (64, 64)),
        ((3, 96, 80), (64, 53)),
    ],
)
def test_fit_handles_image_sizes(shape, input_size):
    images = torch.randint(0, 256, (12, *shape), dtype=torch.uint8)
    labels = torch.arange(12) % 3
    net = fit(images, labels, 3, EvaluatorConfig(epochs=1, batch_size=8), False)
    evaluator = Evaluator(net, {})
    features, logits = evaluator.extract(images, batch_size=5)
    assert net.input_size == input_size
    assert features.shape == (12, net.num_features)
    assert logits.shape == (12, 3)
    assert evaluator.describe()["input_size"] == [shape[0], *input_size]


def test_extract_rejects_wrong_input(digits_evaluator):
    with pytest.raises(UserError, match="uint8"):
        digits_evaluator.extract(torch.zeros(2, 1, 8, 8))
    with pytest.raises(UserError, match="3 channels"):
        digits_evaluator.extract(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_save_load_round_trip(digits_evaluator, tmp_path):
    path = save_evaluator(digits_evaluator, tmp_path / "ev.safetensors")
    loaded = load_evaluator(path)
    images = load_dataset("digits", "test").images[:20]
    assert loaded.hash == digits_evaluator.hash
    assert json.loads(path.with_suffix(".json").read_text())["extractor"]["hash"] == loaded.hash
    torch.testing.assert_close(loaded.extract(images)[0], digits_evaluator.extract(images)[0])
    # A folder holding evaluator.safetensors loads too.
    save_evaluator(digits_evaluator, tmp_path / "folder")
    assert load_evaluator(tmp_path / "folder").hash == loaded.hash


def test_hash_follows_weights():
    torch.manual_seed(0)
    net = EvaluatorNet(1, 4, (8, 8))
    before = weights_hash(net)
    assert weights_hash(net) == before
    with torch.no_grad():
        net.head.bias[0] += 1e-3
    assert weights_hash(net) != before
    net.head.bias.data[0] -= 1e-3
    # A different input size with the same weights is another extractor.
    other = EvaluatorNet(1, 4, (9, 9))
    other.load_state_dict(net.state_dict())
    assert weights_hash(other) != weights_hash(net)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(UserError, match="not found"):
        load_evaluator(tmp_path / "none.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UserError, match="not a cfdg evaluator"):
        load_evaluator(tmp_path / "plain.safetensors")


def test_train_evaluator_cli(tmp_path, capsys):
    out = tmp_path / "digits.safetensors"
    code = main(["train-evaluator", "--data", "digits", "--epochs", "1", "--out", str(out)])
    record = json.loads(out.with_suffix(".json").read_text())
    assert code == 0
    assert 0.0 <= record["test_accuracy"] <= 1.0
    assert record["dataset"] == "digits"
    assert "test accuracy" in capsys.readouterr().out
    assert load_evaluator(out).hash == record["extractor"]["hash"]
