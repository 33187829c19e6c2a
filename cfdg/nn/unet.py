"""A class-conditional UNet that predicts eps from (z_lambda, lambda, label).

The layout follows the ADM UNet of Dhariwal & Nichol (2021, arXiv:2105.05233, Section 3 and
Appendix A): residual blocks with group norm whose scale and shift come from the embedding
("scale-shift norm"), optional BigGAN-style residual up/down-sampling blocks, multi-head
self-attention at chosen resolutions and in the middle block, and skip connections from every
encoder block to the decoder.

Conditioning: lambda = log-SNR is embedded sinusoidally after scaling by 25, so lambda in [-20, 20]
spans [-500, 500], as wide a range as the integer times 0..1000 that this embedding was designed
for in DDPM. A learned class table of num_classes + 1 rows, the last row being the null label, is
added to the time embedding.

Sizes that are not powers of two work: a level downsamples only while the height and width are
even (28 -> 14 -> 7, and the 7x7 level stays 7x7 however many levels follow).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with at most `groups` groups, reduced until it divides `channels`."""
    groups = min(groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters, so a residual branch starts as the identity (ADM does this)."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


def timestep_embedding(logsnr: torch.Tensor, dim: int, scale: float = 25.0) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of `scale * logsnr` [N], frequencies 1 to 1/10000."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=logsnr.device) / half
    )
    angles = scale * logsnr.float()[:, None] * frequencies[None]  # [N, half]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class Resample(nn.Module):
    """Halve (average pool) or double (nearest) the resolution, optionally followed by a conv."""

    def __init__(self, channels: int, mode: str, use_conv: bool) -> None:
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "down":
            x = F.avg_pool2d(x, 2)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class ResBlock(nn.Module):
    """GN-SiLU-conv, embedding as scale/shift of the second GN (or added), SiLU-dropout-conv, skip.

    With `resample` set to "down" or "up", the block changes resolution in its middle and on the
    skip path (the BigGAN-style residual resampling block of ADM).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        scale_shift_norm: bool = True,
        resample: str | None = None,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        self.scale_shift_norm = scale_shift_norm
        self.resample = resample
        self.norm_in = group_norm(in_channels, norm_groups)
        self.conv_in = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_channels, out_channels * (2 if scale_shift_norm else 1))
        self.norm_out = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1)
        )

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm_in(x))
        h = self.conv_in(self._resample(h))
        x = self._resample(x)

        # Condition on the embedding: FiLM of the normalised features (ADM's scale-shift norm).
        emb_out = self.emb(emb)[:, :, None, None].to(h.dtype)
        if self.scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.norm_out(h) * (1 + scale) + shift
        else:
            h = self.norm_out(h + emb_out)
        h = self.conv_out(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, output projection zeroed."""

    def __init__(self, channels: int, head_channels: int, norm_groups: int = 32) -> None:
        super().__init__()
        if channels % head_channels:
            raise ValueError(f"{channels} channels do not split into heads of {head_channels}")
        self.heads = channels // head_channels
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.heads, c // self.heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [N, heads, H*W, head_channels]
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


class Stage(nn.Module):
    """A residual block optionally followed by attention (one step of the encoder or decoder)."""

    def __init__(
        self, block: nn.Module, attention: nn.Module | None = None, takes_skip: bool = False
    ) -> None:
        super().__init__()
        self.block = block
        self.attention = attention
        self.takes_skip = takes_skip

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.block(x, emb) if isinstance(self.block, ResBlock) else self.block(x)
        return self.attention(x) if self.attention is not None else x


class UNet(nn.Module):
    """eps-prediction UNet conditioned on log-SNR and a class label (null id = num_classes).

    Args:
        image_shape: (C, H, W) of the images.
        num_classes: Number of real classes K; the embedding has K + 1 rows, row K is "no label".
        base_channels: Channels of the first level.
        channel_mult: Channel multiplier of each level; level i has base_channels * mult[i].
        num_res_blocks: Residual blocks per level in the encoder; the decoder has one more.
        attention_ds: Downsampling factors (1 = full size) of the levels that get self-attention
            after each residual block.
        head_channels: Channels per attention head.
        dropout: Dropout rate inside the residual blocks.
        resblock_updown: Resample with residual blocks (BigGAN-style) instead of pool/nearest.
        conv_resample: Follow plain pooling/nearest resampling with a 3x3 conv.
        scale_shift_norm: Condition by group-norm scale and shift rather than an added bias.
        norm_groups: Maximum number of group-norm groups.
        emb_channels: Width of the time/class embedding; defaults to 4 * base_channels.
        middle_attention: Self-attention between the two residual blocks of the middle.
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        num_classes: int,
        base_channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_ds: Sequence[int] = (4,),
        head_channels: int = 32,
        dropout: float = 0.0,
        resblock_updown: bool = False,
        conv_resample: bool = True,
        scale_shift_norm: bool = True,
        norm_groups: int = 32,
        emb_channels: int | None = None,
        middle_attention: bool = True,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_classes = int(num_classes)
        self.base_channels = base_channels
        channels_in, height, width = self.image_shape
        emb_channels = emb_channels or 4 * base_channels

        def res_block(c_in: int, c_out: int, resample: str | None = None) -> ResBlock:
            return ResBlock(
                c_in, c_out, emb_channels, dropout, scale_shift_norm, resample, norm_groups
            )

        def attention(c: int, ds: int) -> AttentionBlock | None:
            if ds not in attention_ds:
                return None
            return AttentionBlock(c, min(head_channels, c), norm_groups)

        # Embeddings of lambda and of the label (row num_classes is the null label).
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, emb_channels),
            nn.SiLU(),
            nn.Linear(emb_channels, emb_channels),
        )
        self.label_embed = nn.Embedding(num_classes + 1, emb_channels)

        # Encoder: each level's blocks, then a downsample while the size stays an even number.
        self.input_conv = nn.Conv2d(channels_in, base_channels, 3, padding=1)
        self.encoder = nn.ModuleList()
        skip_channels = [base_channels]
        channels, ds, level_ds, downsampled = base_channels, 1, [], []
        for level, mult in enumerate(channel_mult):
            level_ds.append(ds)
            for _ in range(num_res_blocks):
                out = base_channels * mult
                self.encoder.append(Stage(res_block(channels, out), attention(out, ds)))
                channels = out
                skip_channels.append(channels)
            last = level == len(channel_mult) - 1
            downsampled.append(not last and height % 2 == 0 and width % 2 == 0)
            if downsampled[-1]:
                down = (
                    res_block(channels, channels, "down")
                    if resblock_updown
                    else Resample(channels, "down", conv_resample)
                )
                self.encoder.append(Stage(down))
                skip_channels.append(channels)
                height, width, ds = height // 2, width // 2, ds * 2
        self.level_ds = level_ds

        # Middle: res, attention, res at the lowest resolution.
        middle_attn = AttentionBlock(channels, min(head_channels, channels), norm_groups)
        self.middle = nn.ModuleList(
            [
                Stage(res_block(channels, channels), middle_attn if middle_attention else None),
                Stage(res_block(channels, channels)),
            ]
        )

        # Decoder: mirror of the encoder. Level L has one block per skip its encoder part left
        # (num_res_blocks, plus the input conv or the downsample output below it), then an
        # upsample where the encoder downsampled.
        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            ds = level_ds[level]
            from_below = level == 0 or downsampled[level - 1]
            for _ in range(num_res_blocks + int(from_below)):
                out = base_channels * mult
                block = res_block(channels + skip_channels.pop(), out)
                self.decoder.append(Stage(block, attention(out, ds), takes_skip=True))
                channels = out
            if level > 0 and downsampled[level - 1]:
                up = (
                    res_block(channels, channels, "up")
                    if resblock_updown
                    else Resample(channels, "up", conv_resample)
                )
                self.decoder.append(Stage(up))
        assert not skip_channels, "every encoder output feeds one decoder block"

        self.output = nn.Sequential(
            group_norm(channels, norm_groups),
            nn.SiLU(),
            zero_init(nn.Conv2d(channels, channels_in, 3, padding=1)),
        )

    def forward(self, z: torch.Tensor, logsnr: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Predict eps.

        Args:
            z: Noisy images [N, C, H, W].
            logsnr: lambda of each image [N].
            labels: int64 class ids [N] in [0, num_classes]; num_classes is the null label.

        Returns:
            eps prediction [N, C, H, W], float32.
        """
        emb = self.time_embed(timestep_embedding(logsnr, self.base_channels))
        # Every block applies SiLU to the embedding before its own linear layer (as in ADM);
        # doing it once here is the same.
        emb = F.silu(emb + self.label_embed(labels))

        # Encoder, keeping every output for the decoder.
        h = self.input_conv(z)
        skips = [h]
        for stage in self.encoder:
            h = stage(h, emb)
            skips.append(h)

        for stage in self.middle:
            h = stage(h, emb)

        # Decoder: residual blocks take the matching skip, upsampling stages do not.
        for stage in self.decoder:
            if stage.takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = stage(h, emb)
        return self.output(h).float()
