"""Matplotlib without a display, and one way to save a figure (every PNG of the product goes through here).

House rules for a plot a reader can trust: a title on every figure (`figure` requires one); perplexities compared
on a log axis are drawn as points, never bars (a bar on a log axis starts from an arbitrary floor, so its length
means nothing), with plain-number ticks and the teacher as a reference line; an axis with a single category is
not drawn as a comparison (the caller writes no plot, or draws categories another way).
"""

from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def figure(path: str | Path, title: str, size: tuple[float, float] = (7, 4.5)):
    """Yield (figure, axes) titled `title`; on exit the figure is laid out, saved as a PNG at `path` and closed."""
    import matplotlib

    matplotlib.use("Agg")  # headless: servers and CI have no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    try:
        ax.set_title(title, fontsize=10)
        yield fig, ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def log_ppl_axis(ax, label: str = "held-out perplexity", axis: str = "y") -> None:
    """A log perplexity axis ticked in plain numbers at 1-2-5 steps (50, 100, 200, ...): exponent notation is
    hard to read over the two decades perplexities span here."""
    from matplotlib import ticker

    target = ax.yaxis if axis == "y" else ax.xaxis
    (ax.set_yscale if axis == "y" else ax.set_xscale)("log")
    target.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    target.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    target.set_minor_formatter(ticker.NullFormatter())
    (ax.set_ylabel if axis == "y" else ax.set_xlabel)(label)
    ax.grid(True, axis=axis, which="major", alpha=0.3)
    ax.legend(fontsize=8)
