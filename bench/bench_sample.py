"""Benchmark the guided sampler: cost of guidance and of per-image noise generators.

Measures, for one network preset at 28x28 (median of --repeats runs each):
  1. sampling images/s at w = 0 and at w = 1 (one batched call of 2N rows per step);
  2. one guided step as one 2N-row call against its peer, two separate N-row calls;
  3. the noise draw of one step from N per-image generators (what makes image i independent of
     the batch) against its peer, one batched draw from a single generator.

Usage: python bench/bench_sample.py [--preset cpu] [--batch 256] [--steps 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from cfdg.nn.presets import build_model
from cfdg.samplers import sample


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", help="network preset (default: cpu)")
    parser.add_argument("--batch", type=int, default=256, help="images per batch (default: 256)")
    parser.add_argument("--steps", type=int, default=16, help="sampling steps T (default: 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case (default: 5)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(args.preset, (1, 28, 28), 10).eval()
    n = args.batch
    labels = torch.arange(n) % 10
    z = torch.randn(n, 1, 28, 28)
    logsnr = torch.zeros(n)
    null = torch.full_like(labels, 10)
    results = {}

    # 1. Whole sampling runs.
    for w in (0.0, 1.0):
        seconds = median_seconds(
            lambda w=w: sample(model, labels, w, steps=args.steps, progress=False), args.repeats
        )
        results[f"sample_w{w:g}_images_per_s"] = n / seconds

    # 2. One guided step: a single 2N-row call against two N-row calls.
    with torch.no_grad():
        batched = median_seconds(
            lambda: model(
                torch.cat([z, z]), torch.cat([logsnr, logsnr]), torch.cat([labels, null])
            ),
            args.repeats,
        )
        separate = median_seconds(
            lambda: (model(z, logsnr, labels), model(z, logsnr, null)), args.repeats
        )
    results["guided_call_batched_ms"] = batched * 1e3
    results["guided_call_separate_ms"] = separate * 1e3
    results["guided_call_ratio_separate_over_batched"] = separate / batched

    # 3. Per-image generators against one batched draw.
    generators = [torch.Generator().manual_seed(i) for i in range(n)]
    per_image = median_seconds(
        lambda: torch.stack([torch.randn((1, 28, 28), generator=g) for g in generators]),
        args.repeats * 4,
    )
    single = torch.Generator().manual_seed(0)
    batched_noise = median_seconds(
        lambda: torch.randn((n, 1, 28, 28), generator=single), args.repeats * 4
    )
    results["noise_per_image_ms"] = per_image * 1e3
    results["noise_batched_ms"] = batched_noise * 1e3
    results["noise_per_image_share_of_guided_step"] = per_image / (batched + per_image)

    print(
        json.dumps(
            {
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "preset": args.preset,
                "batch": n,
                "steps": args.steps,
                "repeats": args.repeats,
                **{k: round(v, 4) for k, v in results.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
