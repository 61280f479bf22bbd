"""The TensorBoard custom-scalars layout, built from the statistics in use.

Each statistic declares its chart (`(category, title)`); charts select its
tags by regular expression (a prefix for per-group statistics, exact tags
otherwise), so the layout follows the statistics and the tag names wherever
they change. Spikes written at their own step (`gradients/spike/at`, not a
statistic) join the spike z-score chart when the observer tracks spikes. The
"Curvature" category (Hessian tags, `HessianMonitor`) is always included.
"""

import re

from tensorboard.plugins.custom_scalar import layout_pb2

from gradmon import spikes, statistics, tags


def _exact(tag):
    return "^" + re.escape(tag) + "$"


def _prefix(tag_prefix):
    return "^" + re.escape(tag_prefix)


def _chart(title, regexes):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(regexes)))


def _statistic_charts(recorder, statistic):
    """`[(category, title, regexes)]` for one statistic of a recorder."""
    prefix = recorder.prefix
    if isinstance(statistic, statistics.PenaltyValues):
        base = tags.prefixed(prefix, tags.penalty(""))
        return [("Penalties", "penalty values", [_prefix(base) + r"[^/]+$"]),
                ("Penalties", "penalty share of the loss", [_prefix(base) + r"[^/]+/share$"]),
                ("Penalties", "penalty gradient norms", [_prefix(base) + r"[^/]+/grad_norm$"])]
    if statistic.chart is None:
        return []
    category, title = statistic.chart
    if prefix:
        title = f"{prefix}: {title}"
    if isinstance(statistic, statistics.PerGroup):
        return [(category, title, [_prefix(tags.prefixed(prefix, statistic.tag("")))])]
    return [(category, title, [_exact(t) for t in recorder.tags[statistic]])]


def _spike_charts(recorder):
    """`gradients/spike/at` in the chart of the spike z-scores, when the observer tracks spikes."""
    if getattr(recorder, "spikes", None) is None:
        return []
    category, title = spikes.SpikeScores.chart
    if recorder.prefix:
        title = f"{recorder.prefix}: {title}"
    return [(category, title, [_exact(tags.prefixed(recorder.prefix, tags.SPIKE_AT))])]


def _curvature():
    return ("Curvature", [
        ("top eigenvalues", [_prefix(tags.EIGENVALUE_PREFIX) + r"\d+$", _exact(tags.HESSIAN_MIN_EIGENVALUE)]),
        ("preconditioned top eigenvalues, of P^-1 H", [_prefix(tags.PRECONDITIONED_EIGENVALUE_PREFIX) + r"\d+$"]),
        ("edge of stability: sharpness / the optimizer's threshold, and lr * lambda_1 / 2 (1 = edge)",
         [_exact(tags.EDGE_OF_STABILITY), _exact(tags.GD_EDGE_OF_STABILITY)]),
        ("the optimizer's stability threshold and the sharpness it bounds",
         [_exact(tags.STABILITY_THRESHOLD), _exact(tags.eigenvalue(1)),
          _exact(tags.preconditioned_eigenvalue(1))]),
        ("gradient overlap with the top eigenspace", [_exact(tags.GRADIENT_OVERLAP)]),
        ("per-layer top eigenvalue", [_prefix(tags.LAYER_EIGENVALUE_PREFIX)]),
        ("trace", [_exact(tags.HESSIAN_TRACE)]),
        ("eigenpair residuals", [_prefix(tags.RESIDUAL_PREFIX) + r"\d+$",
                                 _prefix(tags.PRECONDITIONED_RESIDUAL_PREFIX) + r"\d+$",
                                 _prefix(tags.LAYER_RESIDUAL_PREFIX)]),
    ])


def build_layout(recorder=None):
    """A `layout_pb2.Layout`: the charts of `recorder`'s statistics, then "Curvature"."""
    categories = {}
    wanted = []
    if recorder is not None:
        wanted = [c for s in recorder.statistics for c in _statistic_charts(recorder, s)]
        wanted += _spike_charts(recorder)
    for category, title, regexes in wanted:
        charts = categories.setdefault(category, {})
        charts.setdefault(title, [])
        charts[title] += [r for r in regexes if r not in charts[title]]
    name, charts = _curvature()
    categories[name] = dict(charts)
    return layout_pb2.Layout(category=[
        layout_pb2.Category(title=category, chart=[_chart(t, r) for t, r in charts.items()])
        for category, charts in categories.items()])
