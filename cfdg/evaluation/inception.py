"""The standard Inception-v3 FID/IS network, from a weights file the user already has.

cfdg never downloads weights. Pass the file that torch-fidelity uses,
`weights-inception-2015-12-05-6726825d.pth` (a port of the TensorFlow graph behind the
published FID and IS numbers). The network code comes from torch-fidelity
(`pip install torch-fidelity`), which is imported only here, so the default install needs
neither it nor torchvision. Features are the 2048-d pool3 layer (FID, precision/recall);
the 1008 unbiased logits give the Inception Score.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cfdg.errors import UserError
from cfdg.evaluation.extractor import tqdm_disable

log = logging.getLogger(__name__)

KNOWN_FILES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)


def file_sha256(path: str | os.PathLike) -> str:
    """Return the sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _import_feature_extractor():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise UserError(
            f"--inception-weights needs torch-fidelity, which is not installed ({err}); install it "
            "with `pip install torch-fidelity`, or use a cfdg evaluator (--evaluator)"
        ) from None
    return FeatureExtractorInceptionV3


class InceptionExtractor:
    """Inception-v3 pool3 features [N, 2048] and logits [N, 1008] from a local weights file."""

    kind = "inception-v3"
    layer = "pool3"
    input_shape = (3, 299, 299)
    num_classes = 1008

    def __init__(self, weights_path: str | os.PathLike, device: str | torch.device = "cpu"):
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise UserError(
                f"Inception weights not found: {path}; give the local file "
                f"{KNOWN_FILES[0]} (cfdg never downloads it)"
            )
        network_class = _import_feature_extractor()
        if path.name not in KNOWN_FILES:
            log.warning("unexpected Inception weights file name %s (known: %s)", path, KNOWN_FILES)
        # NOTE: only torch-fidelity's file is known to load here. pytorch-fid's file stores the
        # same TensorFlow weights, but this path was never run against it (no copy available).
        try:
            self.net = network_class(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=str(path),
            )
        except (RuntimeError, KeyError, OSError) as err:
            raise UserError(
                f"cannot load Inception weights {path} with torch-fidelity: {err}"
            ) from None
        self.net = self.net.to(device).eval()
        self.device = torch.device(device)
        self.path = path
        self.hash = file_sha256(path)

    def describe(self) -> dict[str, Any]:
        """Return the record that names this extractor in every metric row."""
        return {
            "kind": self.kind,
            "hash": self.hash,
            "layer": self.layer,
            "input_size": list(self.input_shape),
            "num_features": 2048,
            "weights": self.path.name,
        }

    @torch.no_grad()
    def extract(
        self, images: torch.Tensor, batch_size: int = 64, progress: bool | None = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return pool3 features [N, 2048] and logits [N, 1008] of uint8 images [N, C, H, W].

        Grey images are repeated to three channels; torch-fidelity resizes to 299x299.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise UserError(
                f"expected uint8 images [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        features, logits = [], []
        starts = range(0, images.shape[0], batch_size)
        for start in tqdm(starts, desc="inception", disable=tqdm_disable(progress)):
            batch = images[start : start + batch_size].to(self.device)
            if batch.shape[1] == 1:
                batch = batch.repeat(1, 3, 1, 1)
            pool, logit = self.net(batch)
            features.append(pool.reshape(batch.shape[0], -1).float().cpu())
            logits.append(logit.reshape(batch.shape[0], -1).float().cpu())
        return torch.cat(features), torch.cat(logits)
