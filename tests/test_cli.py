"""The `cfdg` command: help text, one-line errors, and the sample and grid subcommands."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cfdg.cli import COMMANDS, build_parser, main


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "cfdg", *args], capture_output=True, text=True, timeout=300
    )


def test_every_subcommand_registered():
    parser = build_parser()
    text = parser.format_help()
    for name in COMMANDS:
        assert name in text, f"subcommand {name} missing from cfdg --help"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_subcommand_help_has_defaults(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text
    assert "(default:" in text


def test_missing_checkpoint_is_one_line():
    result = run_cli("sample", "/nonexistent/run", "--num-samples", "2")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1
    assert "/nonexistent/run" in lines[0]


def test_bad_value_rejected_before_work(tiny_run, tmp_path):
    result = run_cli("sample", str(tiny_run), "--v", "1.5", "--out", str(tmp_path / "s.npz"))
    assert result.returncode == 2
    assert "v must be in [0, 1], got 1.5" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s.npz").exists()


def test_unknown_class_name(tiny_run, tmp_path):
    result = run_cli("sample", str(tiny_run), "--classes", "Shoe", "--out", str(tmp_path / "s.npz"))
    assert result.returncode == 2
    assert "unknown class 'Shoe'" in result.stderr


def test_sample_writes_adm_npz(tiny_run, tmp_path):
    out = tmp_path / "s.npz"
    code = main(
        [
            "sample",
            str(tiny_run),
            "--w",
            "2",
            "--classes",
            "1,3",
            "--num-samples",
            "5",
            "--steps",
            "4",
            "--out",
            str(out),
            "--png",
            str(tmp_path / "png"),
        ]
    )
    assert code == 0
    with np.load(out) as data:
        assert data["arr_0"].dtype == np.uint8
        assert data["arr_0"].shape == (5, 8, 8, 1)
        assert data["arr_1"].tolist() == [1, 3, 1, 3, 1]
    settings = json.loads(out.with_suffix(".json").read_text())
    assert settings["w"] == 2.0
    assert settings["steps"] == 4
    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert len(pngs) == 5
    # Each PNG contains the sample's own pixels, equal to its row of arr_0.
    with np.load(tmp_path / "s.npz") as data:
        first = data["arr_0"][0]
    with Image.open(pngs[0]) as image:
        assert image.size == (first.shape[1], first.shape[0])
        np.testing.assert_array_equal(np.asarray(image), first[:, :, 0])


def test_sample_config_file(tiny_run, tmp_path):
    config = tmp_path / "sample.toml"
    config.write_text('num_samples = 3\nsteps = 3\n[sample]\nw = 0.5\nclasses = "2"\n')
    out = tmp_path / "s.npz"
    assert main(["sample", str(tiny_run), "--config", str(config), "--out", str(out)]) == 0
    with np.load(out) as data:
        assert data["arr_1"].tolist() == [2, 2, 2]
    assert json.loads(out.with_suffix(".json").read_text())["w"] == 0.5


def test_grid_writes_png(tiny_run, tmp_path):
    out = tmp_path / "grid.png"
    code = main(
        [
            "grid",
            str(tiny_run),
            "--w",
            "1",
            "--classes",
            "0,1,2",
            "--per-class",
            "4",
            "--steps",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100


def test_corrupt_data_file_is_one_line(tmp_path):
    # A truncated .npz: it starts like a zip archive but its directory is missing.
    whole = tmp_path / "whole.npz"
    np.savez(whole, images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(whole.read_bytes()[:200])
    out = tmp_path / "run"
    result = run_cli("train", "--data", str(garbage), "--preset", "tiny", "--out", str(out))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1
    assert "BadZipFile" in lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "bogus"], "invalid device 'bogus'"),
        (["--device", "cpu:5"], "invalid device 'cpu:5'"),
        (["--seed", str(2**63)], "--seed must be in"),
        (["--logsnr-min=-800"], "logsnr range"),
        (["--grad-clip", "nan"], "--grad-clip must be finite"),
    ],
)
def test_train_rejects_before_work(tmp_path, args, message, capsys):
    out = tmp_path / "run"
    code = main(["train", "--data", "digits", "--preset", "tiny", "--out", str(out), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--grid-size=-1"], "--grid-size must be 0 or more"),
        (["--max-samples", "0"], "--max-samples must be at least 1"),
        (["--minutes", "inf"], "--minutes must be finite"),
        (["--preset", "huge"], "unknown preset 'huge'"),
    ],
)
def test_demo_rejects_before_work(tmp_path, args, message, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "--data", "digits", "--out", str(out), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_grid_row_titles_unconditional():
    from cfdg.cli.grid import row_titles

    names = ["zero", "one", "two"]
    assert row_titles(1.0, [2, 0], names) == ["two", "zero"]
    assert row_titles(0.0, [1], names) == ["one"]
    assert row_titles(-1.0, [2, 0], names) == ["unconditional", "unconditional"]
