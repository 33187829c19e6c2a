"""Checkpoint folders: atomic writes, pruning, path resolution, loading without pickled code."""

import json

import pytest
import torch

from cfdg.checkpoint import (
    list_checkpoints,
    load_model,
    read_state,
    resolve_checkpoint,
    save_checkpoint,
)
from cfdg.errors import UserError
from cfdg.nn import build_model
from cfdg.nn.presets import get_preset


def tiny_info():
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in get_preset("tiny").unet.items()}
    return {
        "dataset": "toy",
        "class_names": ["a", "b", "c"],
        "num_classes": 3,
        "null_label": 3,
        "image_shape": [1, 8, 8],
        "preset": "tiny",
        "unet": unet,
        "logsnr_min": -20.0,
        "logsnr_max": 20.0,
        "config": {"preset": "tiny"},
    }


def save(run_dir, step, model, ema=None, keep_every=0, state=None):
    ema = ema or model
    state = state if state is not None else {"step": step, "data": {"epoch": 0, "index": step}}
    return save_checkpoint(
        run_dir, step, model.state_dict(), ema.state_dict(), state, tiny_info(), keep_every
    )


@pytest.fixture
def models():
    torch.manual_seed(0)
    online = build_model("tiny", (1, 8, 8), 3)
    ema = build_model("tiny", (1, 8, 8), 3)
    return online, ema


def test_round_trip_ema_and_online(tmp_path, models):
    online, ema = models
    folder = save(tmp_path, 7, online, ema)
    loaded, info = load_model(tmp_path)
    assert not loaded.training
    for key, value in ema.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    loaded_online, _ = load_model(folder, ema=False)
    for key, value in online.state_dict().items():
        assert torch.equal(loaded_online.state_dict()[key], value), key
    assert info["step"] == 7
    assert info["class_names"] == ["a", "b", "c"]
    assert info["image_shape"] == (1, 8, 8)
    assert info["path"] == str(folder)


def test_resolve_accepts_run_folder_and_files(tmp_path, models):
    save(tmp_path, 1, models[0])
    newest = save(tmp_path, 2, models[0], keep_every=1)
    assert resolve_checkpoint(tmp_path) == newest
    assert resolve_checkpoint(tmp_path / "checkpoints") == newest
    assert resolve_checkpoint(newest / "ema.safetensors") == newest
    assert resolve_checkpoint(list_checkpoints(tmp_path)[0]).name == "step_00000001"


def test_missing_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_checkpoint(tmp_path / "absent")
    with pytest.raises(UserError, match="no checkpoint in"):
        load_model(tmp_path)


def test_pruning_keeps_newest_and_multiples(tmp_path, models):
    for step in range(1, 7):
        save(tmp_path, step, models[0], keep_every=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000003",
        "step_00000006",
    ]
    save(tmp_path, 7, models[0], keep_every=0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000007"]


def test_incomplete_folders_are_ignored(tmp_path, models):
    good = save(tmp_path, 4, models[0])
    (tmp_path / "checkpoints" / "step_00000009.tmp").mkdir()
    (tmp_path / "checkpoints" / "step_00000010").mkdir()  # no info.json: a crash mid-copy
    assert resolve_checkpoint(tmp_path) == good


def test_resaving_a_step_replaces_it(tmp_path, models):
    online, ema = models
    save(tmp_path, 3, online)
    folder = save(tmp_path, 3, ema)
    loaded, _ = load_model(folder, ema=False)
    assert torch.equal(loaded.input_conv.weight, ema.input_conv.weight)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003"]


def test_state_is_weights_only(tmp_path, models):
    state = {"step": 5, "optimizer": {"state": {0: {"m": torch.ones(2)}}}}
    save(tmp_path, 5, models[0], state=state)
    loaded = read_state(tmp_path)
    assert loaded["step"] == 5
    assert torch.equal(loaded["optimizer"]["state"][0]["m"], torch.ones(2))


class Payload:
    """An arbitrary class: unpickling it would run module code, so it must be rejected."""


def test_pickled_object_in_state_is_rejected(tmp_path, models):
    folder = save(tmp_path, 1, models[0])
    torch.save({"step": 1, "payload": Payload()}, folder / "state.pt")
    with pytest.raises(UserError, match="cannot read"):
        read_state(folder)


def test_mismatched_weights_rejected(tmp_path, models):
    folder = save(tmp_path, 1, models[0])
    info = json.loads((folder / "info.json").read_text())
    info["unet"]["base_channels"] = 8
    (folder / "info.json").write_text(json.dumps(info))
    with pytest.raises((UserError, RuntimeError)):
        load_model(folder)
