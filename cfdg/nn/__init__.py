"""Networks `model(z, logsnr, labels) -> eps` with attributes `num_classes` and `image_shape`."""

from cfdg.nn.presets import PRESETS, build_model, get_preset
from cfdg.nn.unet import UNet

__all__ = ["PRESETS", "UNet", "build_model", "get_preset"]
