"""End-to-end smoke run of `cfdg demo` on a tiny preset: every output exists and parses."""

import csv
import json

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
