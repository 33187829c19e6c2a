"""End-to-end smoke run of `cfdg demo` on a tiny preset: every output exists and parses."""

import csv
import json
import re

import numpy as np
import pytest
from PIL import Image

from cfdg.cli import main


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CFDG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    args = [
        "demo",
        "--data",
        "digits",
        "--preset",
        "tiny",
        "--minutes",
        "0.3",
        "--w",
        "0,1",
        "--num-samples",
        "40",
        "--steps",
        "4",
        "--evaluator-epochs",
        "1",
        "--grid-size",
        "10",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "cfdg demo on digits" in printed
    assert "metrics.md" in printed

    sweep = out / "sweep"
    rows = json.loads((sweep / "metrics.json").read_text())
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert [row["w"] for row in rows] == [0.0, 1.0]
    for row in rows:
        for key in ("fid", "is_mean", "precision", "recall", "label_accuracy"):
            assert np.isfinite(row[key]), key
        assert row["num_samples"] == 40
        assert row["steps"] == 4
    with open(sweep / "metrics.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2
    assert "| w |" in (sweep / "metrics.md").read_text().replace("  ", " ")
    for name in ("fid_vs_is.png", "fid_is_vs_w.png", "grid_w0.png", "grid_w1.png"):
        with Image.open(sweep / name) as image:
            assert image.format == "PNG", name
    for w in ("0", "1"):
        with np.load(sweep / f"samples_w{w}.npz") as data:
            assert data["arr_0"].shape == (40, 8, 8, 1)
            assert data["arr_1"].shape == (40,)

    # A second run finds every stage done and only re-reads the saved rows.
    assert main(args) == 0
    state = json.loads((out / "demo_state.json").read_text())
    assert set(state) == {"train", "evaluator", "sweep"}


@pytest.mark.parametrize("seconds_left", [-250.0, 0.0])
def test_spent_budget_draws_minimum(seconds_left, caplog):
    from cfdg.cli.demo import DemoConfig, choose_num_samples

    count = choose_num_samples(DemoConfig(steps=64), [0.0, 1.0], seconds_left, 10, 0.002)
    assert count == 100
    assert "run past --minutes" in caplog.text
    assert re.search(r"-\d", caplog.text) is None, "no negative time or sample counts"


def test_num_samples_sized_from_time_left():
    from cfdg.cli.demo import DemoConfig, choose_num_samples

    # w = 0 costs 1 row and w = 1 costs 2 rows per step, so an image costs 3 * 64 rows of 1 ms.
    # 75% of 600 s affords 2343 images, capped at 2000 and rounded down to a multiple of 10.
    assert choose_num_samples(DemoConfig(steps=64), [0.0, 1.0], 600.0, 10, 0.001) == 2000
    # At 10 ms per row the same time affords 234 images, rounded down to 230.
    assert choose_num_samples(DemoConfig(steps=64), [0.0, 1.0], 600.0, 10, 0.01) == 230
