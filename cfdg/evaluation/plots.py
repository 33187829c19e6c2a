"""Sweep figures in the layout of Ho & Salimans (2021): FID vs IS (Fig. 2) and both vs w (Fig. 1).

Each figure is saved to a temporary name and renamed, so a reader never sees a partial PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def _caption(rows: Sequence[dict[str, Any]]) -> str:
    first = rows[0]
    return (
        f"N={first['num_samples']}, T={first['steps']}, v={first['v']:g}, "
        f"extractor {first['extractor_kind']} {str(first['extractor_hash'])[:8]}"
    )


def plot_fid_vs_is(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Plot FID (y) against IS (x), one point per row labelled by its w, joined in w order."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda row: row["w"])
    fig, ax = plt.subplots(figsize=(5, 4))
    xs = [row["is_mean"] for row in rows]
    ys = [row["fid"] for row in rows]
    ax.plot(xs, ys, "o-", color="tab:blue", markersize=4)
    # Labels alternate above and below their points, so that neighbouring w values whose
    # points nearly coincide (as near the FID minimum) stay readable.
    for index, (row, x, y) in enumerate(zip(rows, xs, ys, strict=True)):
        offset = (4, 3) if index % 2 == 0 else (4, -10)
        ax.annotate(
            f"w={row['w']:g}", (x, y), textcoords="offset points", xytext=offset, fontsize=7
        )
    ax.set_xlabel("Inception Score (IS)")
    ax.set_ylabel("FID")
    ax.set_title("FID vs IS over guidance weights", fontsize=10)
    ax.grid(alpha=0.3)
    fig.text(0.5, 0.01, _caption(rows), ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)


def plot_fid_is_vs_w(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Plot FID and IS against the guidance weight w, side by side."""
    plt = _pyplot()
    rows = sorted(rows, key=lambda row: row["w"])
    weights = [row["w"] for row in rows]
    fig, (ax_fid, ax_is) = plt.subplots(1, 2, figsize=(8, 3.4))
    ax_fid.plot(weights, [row["fid"] for row in rows], "o-", color="tab:red", markersize=4)
    ax_fid.set_ylabel("FID")
    ax_is.errorbar(
        weights,
        [row["is_mean"] for row in rows],
        yerr=[row["is_std"] for row in rows],
        fmt="o-",
        color="tab:green",
        markersize=4,
        capsize=2,
    )
    ax_is.set_ylabel("Inception Score (IS)")
    for ax in (ax_fid, ax_is):
        ax.set_xlabel("guidance weight w")
        ax.grid(alpha=0.3)
    fig.suptitle("FID and IS against the guidance weight", fontsize=10)
    fig.text(0.5, 0.01, _caption(rows), ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, path)
