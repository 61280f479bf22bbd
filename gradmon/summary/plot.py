"""The key curves of a run as a PNG (`gradmon summary --png`): matplotlib is imported only
when a picture is drawn, and pyplot's global state is never touched."""

import os

import numpy as np

from gradmon import tags
import gradmon.summary.series as series
from gradmon.summary.health import GD_EDGE
from gradmon._validation import invalid


_PNG_NEEDS_MATPLOTLIB = "gradmon summary --png needs matplotlib: pip install matplotlib"


def _finite_positive(values):
    values = np.asarray(values, dtype=np.float64).copy()
    values[~np.isfinite(values) | (values <= 0)] = np.nan
    return values


def plot(run, report, path):
    """Draws the key curves of `run` into a PNG at `path`.

    Global raw and transformed norms (log scale, NaN/inf steps marked), the
    clip ratio, per-layer norms (log scale), and the Hessian probes' lambda_1,
    lambda_1(P^-1 H) and edge-of-stability ratios when the run has them. Uses matplotlib's Agg canvas without touching
    pyplot's global state. The directory of `path` is created when missing.

    Raises:
        ImportError: when matplotlib is not installed.
        ValueError: when `path` cannot be written.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(_PNG_NEEDS_MATPLOTLIB) from error

    path = os.fspath(path)
    panels = ["norms"]
    if tags.CLIP_RATIO in run:
        panels.append("clip")
    if report.layers:
        panels.append("layers")
    if report.curvature is not None:
        panels.append("curvature")
    fig = Figure(figsize=(9, 2.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        _PANELS[panel](ax, run, report)
        if ax.get_legend_handles_labels()[0] and panel != "curvature":
            if len(ax.get_legend_handles_labels()[0]) <= 12:  # a legend of 100 layers hides the plot
                ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("step")
    try:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fig.savefig(path, format="png", dpi=100)
    except OSError as error:
        raise invalid("png", "a writable file path", path) from error


def _draw_norms(ax, run, report):
    """Global raw and transformed norms (log scale), NaN/inf and overflow steps marked."""
    for kind in tags.KINDS:
        if tags.global_norm(kind) in run:
            steps, values = run[tags.global_norm(kind)]
            ax.plot(steps, _finite_positive(values), label=f"{kind} global norm")
    steps, values = run[tags.global_norm(tags.RAW)]
    bad = steps[~np.isfinite(values)]
    if tags.nonfinite_total(tags.RAW) in run:
        s, v = run[tags.nonfinite_total(tags.RAW)]
        bad = np.union1d(bad, s[v > 0])
    overflow = np.array(report.summary.excluded_steps, dtype=np.int64)
    if len(overflow):
        ax.vlines(overflow, 0, 1, transform=ax.get_xaxis_transform(), colors="gray",
                  alpha=0.3, label="loss-scale overflow")
    bad = np.setdiff1d(bad, overflow)
    if len(bad):
        ax.vlines(bad, 0, 1, transform=ax.get_xaxis_transform(), colors="red",
                  alpha=0.3, label="NaN/inf gradient")
    ax.set_yscale("log")
    ax.set_title("gradient norm")


def _draw_clip(ax, run, report):
    steps, values = run[tags.CLIP_RATIO]
    ax.plot(steps, values, color="tab:orange")
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_title("clip ratio ||transformed|| / ||raw|| (1 = untouched)")


def _draw_layers(ax, run, report):
    raw_norms = series.per_path(run, series.stat_prefix(tags.RAW, "norm"))
    for layer in report.layers:
        steps, values = series.layer_norm(raw_norms, layer.variables)
        ax.plot(steps, _finite_positive(values), label=layer.name)
    ax.set_yscale("log")
    ax.set_title("raw gradient norm per layer")


def _draw_curvature(ax, run, report):
    """lambda_1 (and lambda_1(P^-1 H)); the edge-of-stability ratios on a second axis."""
    for tag, label in ((tags.eigenvalue(1), "lambda_1"),
                       (tags.preconditioned_eigenvalue(1), "lambda_1(P^-1 H)")):
        if tag in run:
            ax.plot(*run[tag], marker=".", label=label)
    ax.set_title("top Hessian eigenvalue")
    old = report.curvature is not None and report.curvature.edge_of_stability_meaning == GD_EDGE
    edges = [(tags.EDGE_OF_STABILITY, "lr*lambda_1/2" if old else "sharpness / threshold",
              "tab:red"), (tags.GD_EDGE_OF_STABILITY, "lr*lambda_1/2", "tab:purple")]
    edges = [e for e in edges if e[0] in run]
    if edges:
        twin = ax.twinx()
        for tag, label, color in edges:
            twin.plot(*run[tag], marker=".", color=color, label=label)
        twin.axhline(1.0, color="tab:red", lw=0.8, ls="--")
        twin.set_ylabel(", ".join(label for _, label, _ in edges))
        ax.set_title("top Hessian eigenvalue and edge of stability (dashed: 1)")


_PANELS = {"norms": _draw_norms, "clip": _draw_clip, "layers": _draw_layers, "curvature": _draw_curvature}
