"""A sweep under torchrun with two gloo processes gives the same samples and rows as one process."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from cfdg.checkpoint import save_checkpoint
from cfdg.data import load_dataset
from cfdg.evaluation.extractor import Evaluator, EvaluatorConfig, fit, save_evaluator
from cfdg.nn.presets import build_model, get_preset

METRICS = ("fid", "is_mean", "is_std", "precision", "recall", "density", "coverage")


def make_checkpoint(run_dir):
    """Save a tiny UNet for 8x8 grey digits with random (not zero) output weights."""
    torch.manual_seed(0)
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


def run_cli(args, env):
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_sweep_two_processes_match_one(tmp_path):
    make_checkpoint(tmp_path / "run")
    train = load_dataset("digits", "train")
    net = fit(train.images, train.labels, 10, EvaluatorConfig(epochs=1, batch_size=64), False)
    evaluator = save_evaluator(Evaluator(net, {"dataset": "digits"}), tmp_path / "ev.safetensors")
    env = {**os.environ, "CFDG_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # 13 samples split 6 / 7 over two ranks; 5 grid images cover an uneven split as well.
    common = [str(tmp_path / "run"), "--w", "0,1.5", "--num-samples", "13", "--steps", "3"]
    common += ["--batch-size", "4", "--evaluator", str(evaluator), "--device", "cpu"]
    common += ["--grid-size", "5", "--grid-classes", "2"]

    run_cli([sys.executable, "-m", "cfdg", "sweep", *common, "--out", str(tmp_path / "one")], env)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc_per_node", "2", "-m", "cfdg", "sweep"]
    run_cli([*launcher, *common, "--out", str(tmp_path / "two")], env)

    for name in ("samples_w0.npz", "samples_w1.5.npz", "grid_samples_w1.5.npz"):
        with np.load(tmp_path / "one" / name) as one, np.load(tmp_path / "two" / name) as two:
            assert np.array_equal(one["arr_0"], two["arr_0"]), name
            assert np.array_equal(one["arr_1"], two["arr_1"]), name
    rows_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    rows_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert [row["w"] for row in rows_two] == [0.0, 1.5]
    for one, two in zip(rows_one, rows_two, strict=True):
        for key in METRICS:
            assert two[key] == pytest.approx(one[key], rel=1e-9), key
        assert two["label_accuracy"] == one["label_accuracy"]
