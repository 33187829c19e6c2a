"""The training loop on the tiny preset and digits: exact resume, logs, budgets, guards, CLI."""

import json
import logging
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from cfdg import diffusion
from cfdg.checkpoint import latest_checkpoint, list_checkpoints, load_model, read_state
from cfdg.cli import main
from cfdg.errors import UserError
from cfdg.train import NonFiniteLossError, TrainConfig, train


@pytest.fixture(autouse=True)
def one_thread():
    """Run on one thread: the tiny network's small ops stall on two threads when other jobs share
    the CPU, and no check here depends on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(out, **overrides):
    values = dict(
        data="digits",
        preset="tiny",
        out=str(out),
        batch_size=16,
        max_steps=10,
        log_every=5,
        sample_every=0,
        checkpoint_every=100,
        warmup_steps=3,
        device="cpu",
    )
    values.update(overrides)
    return TrainConfig(**values)


def weights(run_dir, name):
    return load_file(latest_checkpoint(run_dir) / name)


def assert_same_tensors(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bitwise_exact(tmp_path, precision):
    straight = train(tiny_config(tmp_path / "straight", precision=precision, hflip=True))
    halves = tmp_path / "halves"
    train(tiny_config(halves, max_steps=5, precision=precision, hflip=True))
    train(tiny_config(halves, max_steps=10, precision=precision, hflip=True, resume=True))
    assert_same_tensors(
        weights(straight, "model.safetensors"), weights(halves, "model.safetensors")
    )
    assert_same_tensors(weights(straight, "ema.safetensors"), weights(halves, "ema.safetensors"))
    state_a, state_b = read_state(straight), read_state(halves)
    assert state_a["step"] == state_b["step"] == 10
    assert state_a["data"] == state_b["data"]
    moments_a = state_a["optimizer"]["state"][0]["exp_avg_sq"]
    assert torch.equal(moments_a, state_b["optimizer"]["state"][0]["exp_avg_sq"])


def test_metrics_config_samples_written(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", max_steps=3, log_every=1, sample_every=3))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    record = json.loads(lines[-1])
    for key in ("step", "total", "loss", "lr", "images_per_s", "elapsed_s", "eta_s"):
        assert key in record, key
    for key in ("loss_q0", "loss_q1", "loss_q2", "loss_q3", "grad_norm", "epoch"):
        assert key in record, key
    assert record["step"] == 3
    assert record["total"] == 3
    assert record["lr"] == pytest.approx(2e-3)
    assert 0.1 < record["loss"] < 10.0
    assert (run_dir / "loss.csv").read_text().splitlines()[0].startswith("step,total,epoch,loss")
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["preset"] == "tiny"
    assert saved["lr"] == 2e-3
    assert saved["precision"] in ("fp32", "bf16")
    assert (run_dir / "samples" / "step_000003.png").stat().st_size > 1000


def test_load_model_returns_ema_in_eval(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", max_steps=2))
    model, info = load_model(run_dir)
    assert not model.training
    assert info["num_classes"] == 10
    assert info["null_label"] == 10
    assert info["image_shape"] == (1, 8, 8)
    assert info["class_names"] == [str(d) for d in range(10)]
    assert info["dataset"] == "digits"
    assert info["preset"] == "tiny"
    assert info["step"] == 2
    assert (info["logsnr_min"], info["logsnr_max"]) == (-20.0, 20.0)
    assert info["config"]["batch_size"] == 16
    ema = weights(run_dir, "ema.safetensors")
    assert_same_tensors(model.state_dict(), ema)
    online, _ = load_model(run_dir, ema=False)
    key = "input_conv.weight"
    assert not torch.equal(online.state_dict()[key], ema[key])


def test_ema_warmup_after_one_step(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", max_steps=1, warmup_steps=0))
    online, ema = weights(run_dir, "model.safetensors"), weights(run_dir, "ema.safetensors")
    # The output conv starts at zero, and after step 1 the decay is min(0.9999, 2 / 11), so the
    # EMA is 9/11 of the online value.
    key = "output.2.weight"
    assert online[key].abs().max() > 0
    torch.testing.assert_close(ema[key], online[key] * (9 / 11), rtol=1e-6, atol=1e-9)


def test_checkpoints_keep_last_and_every_kth(tmp_path):
    run_dir = train(tiny_config(tmp_path / "run", max_steps=8, checkpoint_every=2, keep_every=4))
    steps = [int(p.name.split("_")[1]) for p in list_checkpoints(run_dir)]
    assert steps == [4, 8]
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_nonfinite_loss_stops_and_keeps_good_checkpoint(tmp_path, monkeypatch):
    real = diffusion.training_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        if calls["n"] >= 4:
            out.loss = out.loss * float("nan")
            out.per_sample = out.per_sample * float("nan")
        return out

    monkeypatch.setattr(diffusion, "training_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite") as error:
        train(tiny_config(tmp_path / "run", checkpoint_every=2, log_every=100))
    assert "step_00000002" in str(error.value)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]


def send_signal_at_step(monkeypatch, step, signum):
    """Make the training loss send `signum` to this process when step `step` computes it."""
    real = diffusion.training_losses
    calls = {"n": 0}

    def interrupting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "training_losses", interrupting)


def test_sigterm_saves_and_stops(tmp_path, monkeypatch):
    send_signal_at_step(monkeypatch, 3, signal.SIGTERM)
    run_dir = train(tiny_config(tmp_path / "run", max_steps=50))
    assert latest_checkpoint(run_dir).name == "step_00000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.fixture
def step_lines(caplog):
    """Return a function listing the training log lines ("step ...") logged so far.

    The handler goes on the `cfdg` logger itself, because the CLI stops it from propagating.
    """
    logger = logging.getLogger("cfdg")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    yield lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def test_minutes_budget_stops_early(tmp_path, step_lines):
    run_dir = train(tiny_config(tmp_path / "run", max_steps=100000, minutes=0.02, log_every=1))
    step = read_state(run_dir)["step"]
    assert 1 <= step < 100000
    # The time budget ends this run, so the log lines leave out the unreachable step total.
    lines = step_lines()
    assert lines
    assert not any("/100000 " in line for line in lines)


def test_log_shows_step_total_without_budget(tmp_path, step_lines):
    train(tiny_config(tmp_path / "run", max_steps=5, log_every=5))
    assert step_lines()[0].startswith("step 5/5 loss ")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": -1.0}, "--lr"),
        ({"p_uncond": 1.5}, "--p-uncond"),
        ({"logsnr_min": 5.0, "logsnr_max": 1.0}, "--logsnr-min"),
        ({"max_steps": 0}, "--max-steps"),
        ({"ema_decay": 1.0}, "--ema-decay"),
        ({"preset": "huge"}, "unknown preset"),
        ({"batch_size": 5000}, "lower --batch-size"),
        ({"data": "nowhere"}, "unknown data source"),
    ],
)
def test_invalid_config_rejected(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train(tiny_config(tmp_path / "run", **overrides))


def test_existing_run_needs_resume(tmp_path):
    train(tiny_config(tmp_path / "run", max_steps=1))
    with pytest.raises(UserError, match="pass --resume"):
        train(tiny_config(tmp_path / "run", max_steps=2))
    with pytest.raises(UserError, match="no checkpoint"):
        train(tiny_config(tmp_path / "other", resume=True))
    with pytest.raises(UserError, match="seed"):
        train(tiny_config(tmp_path / "run", max_steps=2, seed=1, resume=True))


# The command line.


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for field in TrainConfig.__dataclass_fields__:
        assert "--" + field.replace("_", "-") in text, field
    assert "--dry-run" in text


def test_cli_dry_run_prints_resolved_config(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--preset", "tiny", "--out", str(tmp_path / "r"),
                 "--max-steps", "7", "--dry-run"]) == 0  # fmt: skip
    printed = json.loads(capsys.readouterr().out)
    assert printed["max_steps"] == 7
    assert printed["preset"] == "tiny"
    assert not (tmp_path / "r").exists()


def test_cli_train_then_resume_keeps_saved_options(tmp_path, capsys):
    run_dir = tmp_path / "r"
    common = ["train", "--out", str(run_dir), "--sample-every", "0", "--device", "cpu"]
    first = ["--data", "digits", "--preset", "tiny", "--batch-size", "8", "--max-steps", "2"]
    assert main(common + first) == 0
    assert main(common + ["--resume", "--max-steps", "4"]) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["batch_size"] == 8
    assert config["preset"] == "tiny"
    assert read_state(run_dir)["step"] == 4


def test_cli_reports_bad_value_in_one_line(tmp_path, capsys):
    code = main(["train", "--data", "digits", "--out", str(tmp_path), "--p-uncond", "2"])
    assert code == 2
    assert "--p-uncond must be in [0, 1]" in capsys.readouterr().err


def test_config_file_is_read(tmp_path, capsys):
    path = tmp_path / "train.toml"
    path.write_text('data = "digits"\npreset = "tiny"\nmax-steps = 3\n')
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["max_steps"] == 3
    assert printed["data"] == "digits"


def test_final_checkpoint_written_once(tmp_path, monkeypatch):
    import cfdg.train as train_module

    saved_steps = []
    real_save = train_module.save_checkpoint

    def counting_save(run_dir, step, *args, **kwargs):
        saved_steps.append(step)
        return real_save(run_dir, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", counting_save)
    train(tiny_config(tmp_path / "run", max_steps=2, checkpoint_every=1))
    assert saved_steps == [1, 2]


def test_cli_signal_exits_130(tmp_path, monkeypatch):
    send_signal_at_step(monkeypatch, 2, signal.SIGINT)
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--preset", "tiny", "--out", str(out)]
    code = main([*args, "--max-steps", "50", "--sample-every", "0", "--batch-size", "16"])
    assert code == 130
    assert latest_checkpoint(out).name == "step_00000002"


def test_cli_finished_run_exits_0(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--preset", "tiny", "--out", str(out)]
    assert main([*args, "--max-steps", "2", "--sample-every", "0", "--batch-size", "16"]) == 0
