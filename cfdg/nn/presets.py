"""Named UNet configurations and their training defaults; docs/presets.md records their cost.

- `tiny`: tests and smoke runs, a training step on 8x8 digits in milliseconds;
- `cpu`: the 2-core CPU demo on 28x28 Fashion-MNIST;
- `adm64`: the ImageNet 64x64 UNet of Dhariwal & Nichol (2021, arXiv:2105.05233), which
  Ho & Salimans use for classifier-free guidance.

Attention is placed by downsampling factor (1 = full resolution), so a preset fits any image size:
the `cpu` preset attends at 7x7 on 28x28 images and at 2x2 on 8x8 digits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cfdg.errors import UserError
from cfdg.nn.unet import UNet


@dataclass(frozen=True)
class Preset:
    """A UNet configuration with the training defaults that suit it.

    Attributes:
        unet: Keyword arguments of `UNet` (image shape and class count excluded).
        batch_size: Default global batch (images per optimizer step).
        lr: Default AdamW learning rate.
        description: One line for `--help` and the docs.
    """

    unet: dict[str, Any]
    batch_size: int
    lr: float
    description: str


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        unet=dict(
            base_channels=16,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_ds=(2,),
            head_channels=16,
            norm_groups=8,
            conv_resample=False,
        ),
        batch_size=32,
        lr=2e-3,
        description="tests and smoke runs (0.18M parameters)",
    ),
    "cpu": Preset(
        unet=dict(
            base_channels=16,
            channel_mult=(1, 2, 4),
            num_res_blocks=1,
            attention_ds=(4,),
            head_channels=32,
            norm_groups=8,
            conv_resample=False,
        ),
        batch_size=128,
        lr=2e-3,
        description="the 28x28 demo on a 2-core CPU (0.66M parameters)",
    ),
    "adm64": Preset(
        unet=dict(
            base_channels=192,
            channel_mult=(1, 2, 3, 4),
            num_res_blocks=3,
            attention_ds=(2, 4, 8),  # 32x32, 16x16 and 8x8 on 64x64 images.
            head_channels=64,
            dropout=0.1,
            resblock_updown=True,
            scale_shift_norm=True,
            norm_groups=32,
        ),
        batch_size=2048,
        lr=3e-4,
        description="ADM ImageNet 64x64 (Dhariwal & Nichol 2021): 192 channels, mult 1,2,3,4",
    ),
}


def get_preset(name: str) -> Preset:
    """Return the preset called `name`.

    Raises:
        UserError: for an unknown name, listing the known ones.
    """
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[name]


def build_model(
    preset: str, image_shape: Sequence[int], num_classes: int, **overrides: Any
) -> UNet:
    """Build the UNet of a preset for images of `image_shape` (C, H, W) and `num_classes` classes.

    Args:
        overrides: UNet keyword arguments that replace the preset's (for example dropout=0.0).
    """
    return UNet(image_shape, num_classes, **{**get_preset(preset).unet, **overrides})
