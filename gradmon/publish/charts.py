"""Custom-scalars charts from tag names alone, and the "Curvature" layout.

A chart selects tags by regular expression (`_exact`, `_prefix`); `_assemble`
merges `(category, title, regexes, closed)` wishes into a `layout_pb2.Layout`.
The "Curvature" category is built from the tags the Hessian monitor actually
wrote (`curvature_layout`): no per-layer chart without `per_layer`, no trace
chart without `trace`, no preconditioned chart for SGD; `layer_runs` sends each
layer's tags to its run. This module needs only `gradmon.tags` and
TensorBoard's protos: the Hessian side writes its charts without importing the
gradient side; `gradmon.publish.layout` builds the gradient charts on it.
"""

import re

from tensorboard.plugins.custom_scalar import layout_pb2

from gradmon import tags

# Models with more groups than this show the layers that matter in each per-layer chart.
FOCUS_LIMIT = 8
# Layers the focus shows: this many largest and smallest, plus every flagged one (at most
# `FOCUS_LIMIT` in all).
FOCUS_EACH = 2

def _exact(tag):
    return "^" + re.escape(tag) + "$"


def _prefix(tag_prefix):
    return "^" + re.escape(tag_prefix)


def _chart(title, regexes):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(regexes)))


def _assemble(wanted):
    """A `Layout` from `[(category, title, regexes, closed)]`, charts merged by title."""
    categories, closed = {}, {}
    for category, title, regexes, is_closed in wanted:
        charts = categories.setdefault(category, {})
        charts.setdefault(title, [])
        charts[title] += [r for r in regexes if r not in charts[title]]
        closed[category] = is_closed
    return layout_pb2.Layout(category=[
        layout_pb2.Category(title=category, closed=closed[category],
                            chart=[_chart(t, r) for t, r in charts.items()])
        for category, charts in categories.items()])


# (title, regexes) of the "Curvature" charts; a chart is in the layout when a written tag matches.
_CURVATURE = (
    ("top Hessian eigenvalues (curvature: loss / weight^2)",
     [_prefix(tags.EIGENVALUE_PREFIX) + r"\d+$", _exact(tags.HESSIAN_MIN_EIGENVALUE)]),
    ("top eigenvalues of P^-1 H, the preconditioned sharpness (curvature / P)",
     [_prefix(tags.PRECONDITIONED_EIGENVALUE_PREFIX) + r"\d+$"]),
    ("edge of stability: sharpness / the optimizer's threshold (ratio, 1 = edge)",
     [_exact(tags.EDGE_OF_STABILITY), _exact(tags.GD_EDGE_OF_STABILITY)]),
    ("the optimizer's stability threshold (the sharpness it allows: 2/lr for SGD, 38/lr for Adam)",
     [_exact(tags.STABILITY_THRESHOLD)]),
    ("gradient overlap with the top eigenspace (share of |g|^2, 0-1)", [_exact(tags.GRADIENT_OVERLAP)]),
    ("Hessian trace and its standard error (sum of eigenvalues)",
     [_exact(tags.HESSIAN_TRACE), _exact(tags.HESSIAN_TRACE_STDERR)]),
    ("eigenpair residuals ||Hv - lambda v|| (curvature units)",
     [_prefix(tags.RESIDUAL_PREFIX) + r"\d+$", _prefix(tags.PRECONDITIONED_RESIDUAL_PREFIX) + r"\d+$"]),
    ("Hessian-vector products per probe (count)", [_exact(tags.HESSIAN_HVP_COUNT)]),
)
_LAYER_TITLE = "per-layer top eigenvalue of the Hessian block (curvature units)"
_LAYER_RESIDUAL_TITLE = "per-layer eigenpair residuals (curvature units)"


def layer_runs(written):
    """`{tag: run}` for the per-layer Hessian tags among `written` (the layer's run, as its gradients')."""
    out = {}
    for tag in written:
        for prefix in (tags.LAYER_EIGENVALUE_PREFIX, tags.LAYER_RESIDUAL_PREFIX):
            if tag.startswith(prefix):
                out[tag] = tags.group_run(tag[len(prefix):])
    return out


def curvature_layout(written, focus=None):
    """The "Curvature" charts of the Hessian tags a run wrote.

    Args:
        written: `{tag: latest value}` (or the tags) the Hessian monitor wrote.
        focus: the layers per-layer charts show when there are more than
            `FOCUS_LIMIT`; `None`: the largest and smallest top eigenvalues.

    Returns:
        A `layout_pb2.Layout` holding only charts that select a written tag.
    """
    written = dict(written) if isinstance(written, dict) else dict.fromkeys(written)
    wanted = []
    for title, regexes in _CURVATURE:
        if any(re.search(r, tag) for r in regexes for tag in written):
            wanted.append(("Curvature", title, regexes, False))
    layers = {tag[len(tags.LAYER_EIGENVALUE_PREFIX):]: value for tag, value in written.items()
              if tag.startswith(tags.LAYER_EIGENVALUE_PREFIX)}
    if layers:
        every = [_prefix(tags.LAYER_EIGENVALUE_PREFIX)]
        if len(layers) <= FOCUS_LIMIT:
            wanted.append(("Curvature", _LAYER_TITLE, every, False))
        else:
            if focus is None:
                finite = sorted((v, n) for n, v in layers.items() if v is not None and v == v)
                focus = [n for _, n in finite[-FOCUS_EACH - 1:] + finite[:FOCUS_EACH]] or list(layers)
            chosen = [_exact(tags.layer_eigenvalue(n)) for n in layers if n in set(focus)] or every
            wanted.append(("Curvature", f"{_LAYER_TITLE}: layers that matter", chosen, False))
            wanted.append(("Curvature: all layers", f"{_LAYER_TITLE}: all {len(layers)} layers",
                           every, True))
        if any(t.startswith(tags.LAYER_RESIDUAL_PREFIX) for t in written):
            wanted.append(("Curvature: all layers" if len(layers) > FOCUS_LIMIT else "Curvature",
                           _LAYER_RESIDUAL_TITLE, [_prefix(tags.LAYER_RESIDUAL_PREFIX)],
                           len(layers) > FOCUS_LIMIT))
    return _assemble([w for w in wanted if not w[3]] + [w for w in wanted if w[3]])
