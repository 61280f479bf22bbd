"""The TensorBoard custom-scalars layout, built from what a run records.

Each statistic declares its chart (`(category, title)`); charts select its
tags by regular expression, so the layout follows the statistics and the tag
names wherever they change. Titles say the unit (a table below adds it to the
built-in charts); quantities of different scale get charts of their own
(TensorBoard's charts have one linear axis unless the user switches it to log).

Per-group series (a layer's norm, ratios, moments, SNR, curvature) are written
into runs of their own (`group_runs`, `tags.group_run`): TensorBoard colours
lines by run, so each layer has its own colour, the same in every chart, and
the run selector shows, hides or filters layers by name. A model with more
than `FOCUS_LIMIT` groups shows, in each per-layer chart, only the layers that
matter (`focus_groups`: flagged by the health report, largest, smallest; the
first and last layers until a report exists); every layer's chart is one click
away, in the closed category "<category>: all layers".

The "Curvature" category is built from the tags the Hessian monitor actually
wrote (`curvature_layout`, in `gradmon.publish.charts` with the chart
primitives, so that the Hessian side needs nothing of the gradient side; here
re-exported). No chart of a layout selects no tag (`chart_tags` checks it in
the tests).
"""

import os
import re

from gradmon.measure import spikes, statistics
from gradmon import tags
from gradmon.publish.charts import (  # noqa: F401  (curvature_layout, layer_runs: re-exported)
    FOCUS_EACH,
    FOCUS_LIMIT,
    _assemble,
    _exact,
    _prefix,
    curvature_layout,
    layer_runs,
)

# Built-in charts with their unit (a user's statistic keeps the title it declares).
_TITLES = {
    ("Gradients", "per-layer raw norms"): "per-layer raw gradient norm (L2)",
    ("Gradients", "per-layer transformed norms"): "per-layer transformed gradient norm (L2)",
    ("Gradients", "gradient / weight ratio"): "per-layer gradient / weight ratio (||g|| / ||w||)",
    ("Gradients", "update / weight ratio"): "per-layer update / weight ratio (||dw|| / ||w|| per step)",
    ("Gradients", "global norm: raw vs transformed"):
        "global gradient norm: raw vs transformed (L2; zclip threshold)",
    ("Gradients", "non-finite entries and skipped steps"): "non-finite gradient entries (count per step)",
    ("Gradients", "clip ratio and clip fraction"):
        "clipping: ||transformed|| / ||raw|| and clipped share (0-1)",
    ("Gradients", "loss scale (mixed precision)"): "loss scale (mixed precision, factor)",
    ("Gradients", "spikes: z-scores"): "spikes: z-score of the raw gradient norm (std devs)",
    ("Penalties", "data vs total loss"): "data vs total loss (loss units)",
    ("Optimizer", "first moment norms"): "per-layer first moment norm (L2 of the optimizer's m)",
    ("Optimizer", "second moment norms"): "per-layer second moment norm (||sqrt(v)||, gradient units)",
    ("Optimizer", "cosines: update vs -gradient, gradient vs first moment"):
        "cosines: update vs -gradient, gradient vs first moment (-1 to 1)",
}

# Tags that leave their statistic's chart for one of their own scale: `{tag: (category, title)}`.
_STEP_COUNTS = ("Gradients", "skipped, non-finite and overflow steps (count so far)")
_OWN_CHART = {
    tags.SKIPPED_STEPS: _STEP_COUNTS,
    tags.OVERFLOW_STEPS: _STEP_COUNTS,
    getattr(tags, "NONFINITE_STEPS", tags.SKIPPED_STEPS): _STEP_COUNTS,
    tags.SPIKE_COUNT: ("Gradients", "spikes so far (count)"),
    tags.NOISE_SCALE: ("Gradients", "gradient noise scale B_simple (examples)"),
    tags.NOISE_SCALE_EMA: ("Gradients", "gradient noise scale B_simple (examples)"),
    tags.NOISE_GRAD_SQ: ("Gradients", "|G|^2, squared norm of the true gradient (estimate)"),
    tags.NOISE_TRACE_COV: ("Gradients", "tr(Sigma), per-example gradient variance (estimate)"),
}
_SNR_TITLE = "per-layer gradient signal-to-noise B |G|^2 / tr(Sigma)"


def _group_prefix(group_tags):
    """The tag prefix shared by one statistic's per-group tags, up to its last `/`."""
    common = os.path.commonprefix(list(group_tags))
    return common[:common.rfind("/") + 1] if "/" in common else common


def _per_group(recorder, statistic, labels):
    """`[(group, tag)]` of a statistic's per-group tags (its labels that are the recorder's groups)."""
    groups = set(recorder.spec.groups)
    if not groups or not groups <= set(labels):
        return []
    return [(label, tag) for label, tag in zip(labels, recorder.tags[statistic]) if label in groups]


def group_runs(recorder):
    """`{tag: run}`: each per-group tag of `recorder`'s statistics to its group's run.

    Runs are relative to the run directory (`train/<group>` beside `train`);
    an observer's name comes first (`critic/<group>`).
    """
    out = {}
    for statistic, labels, _ in recorder.slices:
        for group, tag in _per_group(recorder, statistic, labels):
            out[tag] = tags.group_run(tags.prefixed(recorder.prefix, group))
    return out


def default_focus(groups, limit=FOCUS_LIMIT):
    """The first and last groups (where vanishing and exploding gradients show first)."""
    groups = list(groups)
    if len(groups) <= limit:
        return groups
    head = (limit + 1) // 2
    return groups[:head] + groups[len(groups) - (limit - head):]


def focus_groups(report, groups, limit=FOCUS_LIMIT, each=FOCUS_EACH):
    """The groups of the layers that matter in a `gradmon.report.HealthReport`.

    Flagged layers (flags first, then notes), then the `each` layers of
    largest and of smallest final raw norm, at most `limit` layers in all.

    Args:
        report: a `HealthReport` of the run.
        groups: the recorder's groups (`spec.groups`), in order.
        limit: most layers. Defaults to `FOCUS_LIMIT`.
        each: largest and smallest layers shown. Defaults to `FOCUS_EACH`.

    Returns:
        The chosen groups in the order of `groups`.
    """
    layers = {layer.name: layer for layer in report.layers}
    named = []
    for finding in list(report.flags) + list(report.notes):
        for name in [finding.subject] + list(finding.layers):
            if name in layers and name not in named:
                named.append(name)
    finite = sorted((l for l in report.layers if l.final_norm == l.final_norm),
                    key=lambda l: l.final_norm)
    ranked = [l.name for l in finite[::-1][:each]] + [l.name for l in finite[:each]]
    chosen = []
    for name in ranked[:each] + named + ranked[each:]:
        if name not in chosen:
            chosen.append(name)
    chosen = chosen[:limit]
    wanted = set()
    for name in chosen:
        wanted.update(layers[name].variables)
        wanted.add(name)
    picked = [g for g in groups if tags.sanitize(g) in wanted or g in wanted]
    return picked or default_focus(groups, limit)


def _titled(category, title, prefix):
    title = _TITLES.get((category, title), title)
    return f"{prefix}: {title}" if prefix else title


def _statistic_charts(recorder, statistic, labels, focus):
    """`[(category, title, regexes, closed)]` for one statistic of a recorder."""
    prefix = recorder.prefix
    if isinstance(statistic, statistics.PenaltyValues):
        base = tags.prefixed(prefix, tags.penalty(""))
        return [("Penalties", _titled("Penalties", "penalty values (loss units)", prefix),
                 [_prefix(base) + r"[^/]+$"], False),
                ("Penalties", _titled("Penalties", "penalty share of the loss (0-1)", prefix),
                 [_prefix(base) + r"[^/]+/share$"], False),
                ("Penalties", _titled("Penalties", "penalty gradient norms (L2)", prefix),
                 [_prefix(base) + r"[^/]+/grad_norm$"], False)]
    if statistic.chart is None:
        return []
    category, title = statistic.chart
    out = []
    grouped = _per_group(recorder, statistic, labels)
    grouped_tags = {tag for _, tag in grouped}
    for tag in recorder.tags[statistic]:
        if tag in grouped_tags:
            continue
        bare = tag[len(tags.prefixed(prefix, "")):] if prefix else tag
        cat, name = _OWN_CHART.get(bare, (category, title))
        out.append((cat, _titled(cat, name, prefix), [_exact(tag)], False))
    if grouped:
        name = _SNR_TITLE if isinstance(statistic, statistics.NoiseScale) else title
        name = _titled(category, name, prefix)
        every = [_prefix(_group_prefix(t for _, t in grouped))]
        if len(grouped) <= FOCUS_LIMIT:
            out.append((category, name, every, False))
        else:
            shown = set(focus if focus is not None else default_focus(g for g, _ in grouped))
            chosen = [_exact(t) for g, t in grouped if g in shown] or every
            out.append((category, f"{name}: layers that matter", chosen, False))
            out.append((f"{category}: all layers", f"{name}: all {len(grouped)} layers", every, True))
    return out


def _spike_charts(recorder):
    """`gradients/spike/at` in the chart of the spike z-scores, when the observer tracks spikes."""
    if getattr(recorder, "spikes", None) is None:
        return []
    category, title = spikes.SpikeScores.chart
    return [(category, _titled(category, title, recorder.prefix),
             [_exact(tags.prefixed(recorder.prefix, tags.SPIKE_AT))], False)]


def build_layout(recorder=None, focus=None):
    """A `layout_pb2.Layout`: the charts of `recorder`'s statistics.

    Args:
        recorder: a `gradmon.recorder.Recorder`; `None` gives an empty layout.
        focus: the groups per-layer charts show when there are more than
            `FOCUS_LIMIT` (`focus_groups`); `None`: the first and last ones.

    Returns:
        A `layout_pb2.Layout` (the Hessian monitor adds "Curvature": `curvature_layout`).
    """
    wanted = []
    if recorder is not None:
        for statistic, labels, _ in recorder.slices:
            wanted += _statistic_charts(recorder, statistic, labels, focus)
        wanted += _spike_charts(recorder)
    # the closed "all layers" categories after the others
    return _assemble([w for w in wanted if not w[3]] + [w for w in wanted if w[3]])


def write_focus(writer, recorder, reports, name=None):
    """Shows in the per-layer charts the layers that matter to the latest health report.

    Only for a model of more than `FOCUS_LIMIT` groups; written again only
    when the choice changes (chart titles stay, so TensorBoard replaces them).

    Args:
        writer: the `MetricWriter` the recorder's layout went to.
        recorder: the observer's `Recorder`.
        reports: the `HealthReport`s `gradmon.writer.write_report` returned.
        name: the observer's name (its report is used). Defaults to `None`.

    Returns:
        The groups shown, or `None` when nothing changed.
    """
    if not reports or recorder is None or len(recorder.spec.groups) <= FOCUS_LIMIT:
        return None
    mine = next((r for r in reports if getattr(r, "name", None) == name), None)
    if mine is None:
        return None
    focus = focus_groups(mine, recorder.spec.groups)
    key = ("focus", id(recorder))
    if writer._reported.get(key) == focus:
        return None
    writer._reported[key] = focus
    writer.write_layout(build_layout(recorder, focus))
    return focus


def chart_tags(layout, written):
    """`{(category, chart title): [tags it selects]}` of `layout` among the tags `written`
    (a chart selecting none would be empty in TensorBoard)."""
    out = {}
    for category in layout.category:
        for chart in category.chart:
            regexes = list(chart.multiline.tag)
            out[(category.title, chart.title)] = [t for t in written
                                                  if any(re.search(r, t) for r in regexes)]
    return out
