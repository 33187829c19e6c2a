"""The UNet and its presets: shapes for every supported size, conditioning, parameter counts."""

import pytest
import torch

from cfdg.errors import UserError
from cfdg.nn import PRESETS, UNet, build_model
from cfdg.nn.unet import timestep_embedding


def randomize_outputs(model):
    """Re-draw the zero-initialised layers, so that every input changes the output."""
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(module.weight, std=0.2)
    return model


def run(model, n=2, labels=None):
    shape = model.image_shape
    z = torch.randn(n, *shape)
    logsnr = torch.linspace(-20, 20, n)
    labels = labels if labels is not None else torch.arange(n) % (model.num_classes + 1)
    return model(z, logsnr, labels)


@pytest.mark.parametrize(
    ("preset", "shape"),
    [
        ("tiny", (1, 8, 8)),
        ("tiny", (1, 28, 28)),
        ("tiny", (1, 7, 7)),
        ("tiny", (3, 5, 9)),
        ("cpu", (1, 28, 28)),
        ("cpu", (1, 8, 8)),
        ("cpu", (3, 32, 32)),
        ("cpu", (3, 64, 64)),
    ],
)
def test_output_shape_matches_input(preset, shape):
    model = build_model(preset, shape, num_classes=10)
    out = run(model)
    assert out.shape == (2, *shape)
    assert out.dtype == torch.float32
    assert model.num_classes == 10
    assert model.image_shape == shape


def test_odd_sizes_stop_downsampling():
    model = UNet((1, 28, 28), 3, base_channels=8, channel_mult=(1, 1, 1, 1), num_res_blocks=1)
    assert model.level_ds == [1, 2, 4, 4]  # 28 -> 14 -> 7, and 7 stays 7
    assert run(model).shape == (2, 1, 28, 28)


def test_zero_init_output_and_null_row():
    model = build_model("tiny", (1, 8, 8), num_classes=4)
    assert model.label_embed.num_embeddings == 5
    assert torch.count_nonzero(run(model)) == 0  # the last conv starts at zero, as in ADM


def test_label_and_logsnr_change_output():
    model = randomize_outputs(build_model("tiny", (1, 8, 8), num_classes=4)).eval()
    z = torch.randn(1, 1, 8, 8).repeat(3, 1, 1, 1)
    same = torch.zeros(3)
    by_label = model(z, same, torch.tensor([0, 1, 4]))
    assert not torch.allclose(by_label[0], by_label[1])
    assert not torch.allclose(by_label[0], by_label[2])  # the null label differs from class 0
    by_logsnr = model(z, torch.tensor([-20.0, 0.0, 20.0]), torch.zeros(3, dtype=torch.int64))
    assert not torch.allclose(by_logsnr[0], by_logsnr[2])


def test_rows_are_independent():
    model = randomize_outputs(build_model("tiny", (1, 8, 8), num_classes=4)).eval()
    z, logsnr, labels = torch.randn(4, 1, 8, 8), torch.randn(4), torch.tensor([0, 1, 2, 4])
    batch = model(z, logsnr, labels)
    alone = torch.cat([model(z[i : i + 1], logsnr[i : i + 1], labels[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)


def test_embedding_spreads_logsnr_range():
    logsnr = torch.linspace(-20, 20, 401)
    emb = timestep_embedding(logsnr, 64)
    assert emb.shape == (401, 64)
    assert torch.isfinite(emb).all()
    # Neighbours 0.1 apart stay distinguishable, and the ends are far apart.
    neighbour = (emb[1:] - emb[:-1]).norm(dim=1)
    assert float(neighbour.min()) > 0.1
    assert float((emb[0] - emb[-1]).norm()) > 3.0


def test_backward_reaches_every_parameter():
    model = randomize_outputs(build_model("tiny", (1, 8, 8), num_classes=3))
    run(model, n=4).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_bf16_autocast_forward():
    model = build_model("tiny", (1, 8, 8), num_classes=3)
    with torch.autocast("cpu", torch.bfloat16):
        out = run(model)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_presets_and_unknown_name():
    assert {"tiny", "cpu", "adm64"} <= set(PRESETS)
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        build_model("huge", (1, 8, 8), 10)


def test_adm64_matches_published_size():
    with torch.device("meta"):
        model = build_model("adm64", (3, 64, 64), num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    # Dhariwal & Nichol report 296M parameters for the class-conditional ImageNet 64x64 model.
    assert 290e6 < count < 300e6
    attention_channels = {
        m.norm.num_channels // m.heads for m in model.modules() if hasattr(m, "heads")
    }
    assert attention_channels == {64}
    assert model.level_ds == [1, 2, 4, 8]


def test_cpu_preset_is_small():
    model = build_model("cpu", (1, 28, 28), num_classes=10)
    assert sum(p.numel() for p in model.parameters()) < 1.5e6
