"""The guidance sweep and `cfdg evaluate` on a tiny random UNet and the scikit-learn digits."""

import csv
import json

import numpy as np
import pytest
import torch

from cfdg.checkpoint import save_checkpoint
from cfdg.cli import main
from cfdg.data import load_dataset
from cfdg.errors import UserError
from cfdg.evaluation import sweep as sweep_module
from cfdg.evaluation.extractor import (
    Evaluator,
    EvaluatorConfig,
    EvaluatorNet,
    fit,
    save_evaluator,
)
from cfdg.evaluation.sweep import SweepConfig, run_sweep
from cfdg.images import load_npz, save_npz
from cfdg.nn.presets import build_model, get_preset

METRICS = ("fid", "is_mean", "is_std", "precision", "recall", "label_accuracy")


def make_checkpoint(run_dir, seed=0):
    """Save a tiny UNet for 8x8 grey digits with random (not zero) output weights."""
    torch.manual_seed(seed)
    model = build_model("tiny", (1, 8, 8), 10)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    info = {
        "unet": dict(get_preset("tiny").unet),
        "image_shape": [1, 8, 8],
        "num_classes": 10,
        "class_names": [str(i) for i in range(10)],
        "dataset": "digits",
        "logsnr_min": -20.0,
        "logsnr_max": 20.0,
    }
    save_checkpoint(run_dir, 1, model.state_dict(), model.state_dict(), {}, info)
    return run_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    train = load_dataset("digits", "train")
    net = fit(train.images, train.labels, 10, EvaluatorConfig(epochs=2, batch_size=64), False)
    evaluator = save_evaluator(Evaluator(net, {"dataset": "digits"}), root / "ev.safetensors")
    return {"run": make_checkpoint(root / "run"), "evaluator": str(evaluator), "root": root}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CFDG_CACHE", str(tmp_path / "cache"))


def config(setup, out, **overrides):
    values = dict(
        checkpoint=str(setup["run"]),
        out=str(out),
        w="0,2",
        num_samples=20,
        steps=3,
        batch_size=8,
        evaluator=setup["evaluator"],
        grid_size=4,
        grid_classes="1,3",
        device="cpu",
    )
    return SweepConfig(**{**values, **overrides})


def test_sweep_writes_outputs(setup, tmp_path):
    out = tmp_path / "sweep"
    rows = run_sweep(config(setup, out), progress=False)
    assert [row["w"] for row in rows] == [0.0, 2.0]
    for row in rows:
        assert row["num_samples"] == 20
        assert row["steps"] == 3
        assert row["v"] == 0.3
        assert row["seed"] == 0
        assert row["checkpoint"].endswith("step_00000001")
        assert len(row["extractor_hash"]) == 64
        assert row["extractor_input_size"] == "1x8x8"
        assert all(np.isfinite(row[key]) for key in METRICS)
    names = ["metrics.csv", "metrics.json", "metrics.md", "fid_vs_is.png", "fid_is_vs_w.png"]
    names += ["grid_w0.png", "grid_w2.png", "grid_class1_w0.png", "grid_class3_w2.png"]
    names += ["grid_class1.png", "grid_class3.png"]
    for name in names:
        assert (out / name).is_file(), name
    assert not list(out.glob("*.tmp"))

    # Tables: one row per w, the same numbers as returned.
    with open(out / "metrics.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [float(r["w"]) for r in table] == [0.0, 2.0]
    assert float(table[1]["fid"]) == pytest.approx(rows[1]["fid"])
    assert json.loads((out / "metrics.json").read_text()) == rows
    assert "| w | FID | IS |" in (out / "metrics.md").read_text()

    # Samples in the ADM layout, balanced labels, settings beside them.
    with np.load(out / "samples_w2.npz") as arrays:
        assert arrays["arr_0"].shape == (20, 8, 8, 1)
        assert arrays["arr_0"].dtype == np.uint8
        assert arrays["arr_1"].tolist() == [i % 10 for i in range(20)]
    settings = json.loads((out / "samples_w2.json").read_text())
    assert settings["w"] == 2.0
    assert settings["steps"] == 3
    assert settings["checkpoint"] == rows[1]["checkpoint"]


def test_sweep_uses_same_seeds_for_every_w(setup, tmp_path):
    run_sweep(config(setup, tmp_path / "a", w="2", grid_size=0), progress=False)
    run_sweep(config(setup, tmp_path / "b", w="0,2", batch_size=7, grid_size=0), progress=False)
    first, _ = load_npz(tmp_path / "a" / "samples_w2.npz")
    second, _ = load_npz(tmp_path / "b" / "samples_w2.npz")
    other_w, _ = load_npz(tmp_path / "b" / "samples_w0.npz")
    assert torch.equal(first, second)
    assert not torch.equal(first, other_w)


def test_sweep_resumes(setup, tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    first = run_sweep(config(setup, out, w="0"), progress=False)
    calls = []
    original = sweep_module._sample_distributed

    def counting(model, labels, *args, **kwargs):
        calls.append(labels.shape[0])
        return original(model, labels, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "_sample_distributed", counting)
    rows = run_sweep(config(setup, out, w="0,2"), progress=False)
    assert rows[0] == first[0]
    assert calls == [20, 4 * 3]  # w=2 only: its samples and its three grids

    # Interrupted after saving the samples of w=2 but before its row: score the saved file.
    saved = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").write_text(json.dumps(saved[:1]))
    calls.clear()
    again = run_sweep(config(setup, out, w="0,2"), progress=False)
    assert calls == []
    # Same images; FID may move in the 8th digit, as the eigenvalues of the rank-deficient
    # covariance product (20 samples, 128 features) are ill-conditioned.
    for key in METRICS:
        assert again[1][key] == pytest.approx(rows[1][key], rel=1e-6)


def test_sweep_rejects_other_settings(setup, tmp_path):
    out = tmp_path / "sweep"
    run_sweep(config(setup, out, w="0", grid_size=0), progress=False)
    with pytest.raises(UserError, match="other settings.*steps"):
        run_sweep(config(setup, out, w="0", grid_size=0, steps=4), progress=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_samples": 5}, "too small"),
        ({"v": 1.5}, "--v"),
        ({"w": "0,x"}, "--w"),
        ({"w": "1,1"}, "twice"),
        ({"grid_classes": "12"}, "out of range"),
        ({"evaluator": "/nonexistent/ev.safetensors"}, "evaluator not found"),
        ({"nearest_k": -3}, "--nearest-k must be at least 1"),
        ({"nearest_k": 0}, "--nearest-k must be at least 1"),
        ({"is_splits": 0}, "--is-splits must be at least 1"),
        ({"pr_max_samples": -5}, "--pr-max-samples must be at least 1"),
        ({"batch_size": 0}, "--batch-size must be at least 1"),
    ],
)
def test_sweep_rejects_bad_options(setup, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run_sweep(config(setup, tmp_path / "sweep", **overrides), progress=False)
    assert not (tmp_path / "sweep" / "metrics.json").exists()


def test_sweep_cli(setup, tmp_path, capsys):
    # Options from a TOML file (lists allowed), one flag overriding the file.
    out = tmp_path / "cli"
    toml = tmp_path / "sweep.toml"
    toml.write_text("[sweep]\nw = [0, 1]\nnum_samples = 12\nsteps = 5\ngrid_size = 0\n")
    args = ["sweep", str(setup["run"]), "--config", str(toml), "--steps", "2"]
    args += ["--evaluator", setup["evaluator"], "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    rows = json.loads((out / "metrics.json").read_text())
    assert [row["w"] for row in rows] == [0.0, 1.0]
    assert rows[0]["num_samples"] == 12
    assert rows[0]["steps"] == 2
    assert (out / "log.txt").is_file()

    # `evaluate` finds the reference through the settings JSON and gives the same numbers.
    capsys.readouterr()
    assert main(["evaluate", str(out / "samples_w1.npz"), "--evaluator", setup["evaluator"]]) == 0
    record = json.loads(capsys.readouterr().out)
    for key in METRICS:
        assert record[key] == pytest.approx(rows[1][key], rel=1e-6)


def test_evaluate_scores_external_file(setup, tmp_path, capsys):
    # A file from another tool: digits test images, no labels, no settings JSON.
    test = load_dataset("digits", "test")
    save_npz(tmp_path / "external.npz", test.images)
    args = ["evaluate", str(tmp_path / "external.npz"), "--reference", "digits"]
    assert main(args + ["--evaluator", setup["evaluator"]]) == 0
    record = json.loads(capsys.readouterr().out)
    assert abs(record["fid"]) < 1e-6  # the reference itself
    assert record["label_accuracy"] is None
    assert record["num_samples"] == len(test)

    # With labels, label accuracy is reported; the output file contains the same record.
    save_npz(tmp_path / "labelled.npz", test.images, test.labels)
    args = ["evaluate", str(tmp_path / "labelled.npz"), "--reference", "digits"]
    args += ["--evaluator", setup["evaluator"], "--out", str(tmp_path / "m.json")]
    assert main(args) == 0
    record = json.loads((tmp_path / "m.json").read_text())
    assert 0.5 < record["label_accuracy"] <= 1.0


def test_evaluate_needs_reference(setup, tmp_path, capsys):
    save_npz(tmp_path / "s.npz", torch.zeros(12, 1, 8, 8, dtype=torch.uint8))
    assert main(["evaluate", str(tmp_path / "s.npz"), "--evaluator", setup["evaluator"]]) == 2
    assert "--reference" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("channels", "classes", "message"), [(3, 10, "channels"), (1, 4, "classes")]
)
def test_sweep_rejects_unfit_evaluator(setup, tmp_path, channels, classes, message):
    net = EvaluatorNet(channels, classes, (8, 8))
    path = save_evaluator(Evaluator(net, {"dataset": "digits"}), tmp_path / "other.safetensors")
    with pytest.raises(UserError, match=message):
        run_sweep(config(setup, tmp_path / "sweep", evaluator=str(path)), progress=False)
