"""Training speed of each preset: images/s (fp32, bf16), full-step overhead, memory, forward cost.

Each (preset, precision) runs in a fresh subprocess, so that its peak resident memory (measured
after two training steps, before anything else is built) is its own. It times, interleaved over
several repeats:

- the full training step of `cfdg.train.Trainer` (data batch, label dropout, lambda and noise
  draws, autocast, backward, gradient clipping, AdamW, EMA, loss window and a log record every
  `log_every` steps);
- a bare step of the same network: a fixed batch, forward, MSE against fixed noise, backward,
  AdamW, nothing else;
- a no-grad forward pass, in ms per image.

Usage: python bench/bench_train.py [--presets tiny,cpu,adm64] [--repeats 5] [--threads N]
                                  [--json FILE]
The `adm64` preset runs a few steps at batch 2 on the CPU (its default batch of 2048 is for GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

# Per preset: data set, batch for the training step, steps per repeat, batch for the forward pass.
SETTINGS = {
    "tiny": {"data": "digits", "batch": 32, "steps": 20, "forward_batch": 256},
    "cpu": {"data": "fashion-mnist", "batch": 128, "steps": 10, "forward_batch": 256},
    "adm64": {"data": "imagenet-like", "batch": 2, "steps": 1, "forward_batch": 4},
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fake_imagenet(folder: str) -> str:
    """Write a small downsampled-ImageNet batch file of random 64x64 images; return the folder."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(64, 3 * 64 * 64), dtype=np.uint8)
    labels = rng.integers(1, 1001, size=64)
    np.savez(os.path.join(folder, "train_data_batch_1.npz"), data=data, labels=labels)
    return folder


def time_calls(fn, count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
        fn()
    return time.perf_counter() - start


def worker(preset: str, precision: str, repeats: int) -> dict:
    """Measure one preset at one precision in this process."""
    import torch

    from cfdg.train import MetricsLogger, TrainConfig, Trainer

    settings = SETTINGS[preset]
    batch, steps = settings["batch"], settings["steps"]
    tmp = tempfile.mkdtemp(prefix="cfdg-bench-")
    data = fake_imagenet(tmp) if settings["data"] == "imagenet-like" else settings["data"]
    config = TrainConfig(
        data=data,
        preset=preset,
        out=os.path.join(tmp, "run"),
        batch_size=batch,
        max_steps=10**9,
        log_every=10 if steps >= 10 else 1,
        sample_every=0,
        checkpoint_every=10**9,
        precision=precision,
        device="cpu",
    )
    trainer = Trainer(config)
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(trainer, time.monotonic())

    class Bar:
        def set_postfix(self, **kwargs):
            pass

    def full_step():
        trainer.train_step()
        if trainer.step % config.log_every == 0:
            trainer._log(logger, Bar())

    # Peak memory of training alone, before the bare copy below exists.
    rss_before = peak_rss_mb()
    full_step()
    full_step()
    rss_train = peak_rss_mb()

    # The bare step: same architecture and optimizer, none of the training-loop work.
    bare = type(trainer.model)(
        trainer.model.image_shape, trainer.model.num_classes, **trainer.unet_kwargs
    )
    optimizer = torch.optim.AdamW(bare.parameters(), lr=1e-4, fused=True)
    shape = (batch, *trainer.model.image_shape)
    z, eps = torch.randn(shape), torch.randn(shape)
    logsnr = torch.rand(batch) * 40 - 20
    labels = torch.randint(0, trainer.model.num_classes + 1, (batch,))
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16")

    def bare_step():
        with autocast:
            loss = (bare(z, logsnr, labels).float() - eps).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    forward_batch = settings["forward_batch"]
    fz = torch.randn(forward_batch, *trainer.model.image_shape)
    flogsnr = torch.rand(forward_batch) * 40 - 20
    flabels = torch.randint(0, trainer.model.num_classes, (forward_batch,))
    trainer.ema.eval()

    def forward():
        with torch.no_grad(), autocast:
            trainer.ema(fz, flogsnr, flabels)

    # Warm up the other paths once, then interleave the repeats so load changes hit all of them.
    bare_step()
    forward()
    full, bare_times, forward_times = [], [], []
    for _ in range(repeats):
        full.append(time_calls(full_step, steps) / steps)
        bare_times.append(time_calls(bare_step, steps) / steps)
        forward_times.append(time_calls(forward, 1) / forward_batch)
    ratios = [f / b for f, b in zip(full, bare_times, strict=True)]
    return {
        "preset": preset,
        "precision": precision,
        "batch": batch,
        "image_shape": list(trainer.model.image_shape),
        "params_m": sum(p.numel() for p in trainer.model.parameters()) / 1e6,
        "full_images_per_s": batch / statistics.median(full),
        "bare_images_per_s": batch / statistics.median(bare_times),
        "full_over_bare": statistics.median(ratios),
        "forward_ms_per_image": 1e3 * statistics.median(forward_times),
        "forward_batch": forward_batch,
        "peak_rss_train_mb": rss_train,
        "rss_before_steps_mb": rss_before,
        "repeats": repeats,
        "steps_per_repeat": steps,
    }


def machine() -> dict:
    import torch

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as file:
            model = next(line.split(":", 1)[1].strip() for line in file if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", default="tiny,cpu,adm64")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: torch's)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument(
        "--worker", nargs=2, metavar=("PRESET", "PRECISION"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(worker(*args.worker, args.repeats)))
        return 0

    results = []
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            repeats = 1 if preset == "adm64" else args.repeats
            command = [sys.executable, __file__, "--worker", preset, precision]
            command += ["--repeats", str(repeats)]
            command += ["--threads", str(args.threads)] if args.threads else []
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
            print(format_row(results[-1]), flush=True)
    report = {"machine": machine(), "command": " ".join(sys.argv), "results": results}
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    print(json.dumps(report["machine"]))
    return 0


def format_row(r: dict) -> str:
    return (
        f"{r['preset']:6s} {r['precision']:4s} batch {r['batch']:4d}: "
        f"full {r['full_images_per_s']:7.1f} img/s, bare {r['bare_images_per_s']:7.1f} img/s, "
        f"full/bare {r['full_over_bare']:.3f}, "
        f"forward {r['forward_ms_per_image']:.3f} ms/img (batch {r['forward_batch']}), "
        f"peak RSS {r['peak_rss_train_mb']:.0f} MB (before steps {r['rss_before_steps_mb']:.0f} MB)"
    )


if __name__ == "__main__":
    sys.exit(main())
