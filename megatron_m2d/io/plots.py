"""Matplotlib without a display, and one way to save a figure (every PNG of the product goes through here)."""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def figure(path: str | Path, size: tuple[float, float] = (7, 4.5)):
    """Yield (figure, axes); on exit the figure is laid out, saved as a PNG at `path` and closed."""
    import matplotlib

    matplotlib.use("Agg")  # headless: servers and CI have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def log_ppl_axis(ax, label: str = "held-out perplexity") -> None:
    ax.set_yscale("log")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
