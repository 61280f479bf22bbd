"""The numbers of a health report, read from one observer's series (no judging, no display).

`observer_run` picks one observer's series out of a run, `resolve_grouping`
decides what a row is, and `measure` turns the series into a report's numbers:
the whole model's (`GlobalHealth`), each layer's (`LayerHealth`), the
curvature, the spikes and the optimizer's state, with loss-scale overflow
steps left out. `judgement` judges them (the rules: `gradmon.summary.report`).
"""

import dataclasses
import math
import typing

import numpy as np

from gradmon import tags
import gradmon.summary.series as series
from gradmon.summary.events import Run, observer_names
from gradmon.summary.health import (
    GD_EDGE, GROUPINGS, OPTIMIZER_EDGE, Curvature, GlobalHealth, LayerHealth, OptimizerHealth, Spikes, Trend)


_CLIP_TOLERANCE = 1e-6  # relative: float32 rounding is not clipping
_EMBEDDING_WEIGHT = "embeddings"  # keras.layers.Embedding's table: sparse gradients by design
# Step counters and loss-scale bookkeeping: kept whole when overflow steps are left out.
_BOOKKEEPING = (tags.OVERFLOW_STEPS, tags.SKIPPED_STEPS, tags.LOSS_SCALE, tags.NO_GRADIENT,
                tags.SPIKE_COUNT, tags.SPIKE_AT)
# Written only by runs where `hessian/edge_of_stability` is the optimizer's own ratio.
_NEW_EDGE_TAGS = (tags.GD_EDGE_OF_STABILITY, tags.STABILITY_THRESHOLD, tags.preconditioned_eigenvalue(1))


@dataclasses.dataclass
class Measured:
    """What `measure` read from one observer's run: a report's numbers, and what judging
    them needs beside them.

    `run` is the run judged (loss-scale overflow steps left out of the gradient
    series); `layer_clipped_tail` each layer's clipped share over its tail (only
    when clipping is known per layer); `dead_norm` whether a layer's norm is
    exactly 0 at every tail step; `poisoned` why a layer's weights are NaN/inf
    (`None`: they are not; empty in a run without non-finite steps).
    """

    run: typing.Mapping
    summary: GlobalHealth
    layers: typing.List[LayerHealth]
    clipping_source: str
    layer_clipped_tail: typing.Dict[str, float]
    dead_norm: typing.Dict[str, bool]
    poisoned: typing.Dict[str, typing.Optional[str]]
    curvature: typing.Optional[Curvature]
    spikes: typing.Optional[Spikes]
    optimizer: typing.Optional[OptimizerHealth]


def resolve_grouping(run, grouping):
    """`(grouping, source)`: `grouping` itself (`"given"`), or for `"auto"` the one the
    observer recorded (`"recorded"`), else `infer_grouping` of its labels (`"inferred"`)."""
    if grouping != "auto":
        return grouping, "given"
    recorded = run.config.get("grouping")
    if recorded in GROUPINGS:
        return recorded, "recorded"
    return infer_grouping(series.per_path(run, series.stat_prefix(tags.RAW, "norm"))), "inferred"


def measure(run, thresholds, grouping):
    """A `Measured` of one observer's run (`observer_run`), its rows grouped by `grouping`."""
    all_steps = run[tags.global_norm(tags.RAW)][0]
    bad, suspect = nonfinite_steps(run)
    overflows = overflow_steps(run, suspect)
    if len(overflows) == len(all_steps):  # nothing would be left to judge
        overflows = set()
    run = without_steps(run, overflows)
    summary = global_health(run, all_steps, bad - overflows, overflows, thresholds)
    # a layer may be poisoned by NaN only in a run that had a non-finite step (not an overflow)
    had_nonfinite = bool(summary.nonfinite_updates or summary.nonfinite_steps
                         or (suspect - overflows))
    layers, clipping_source, clipped_tail, dead_norm, poisoned = measure_layers(
        run, grouping, summary, thresholds, had_nonfinite)
    return Measured(run=run, summary=summary, layers=layers, clipping_source=clipping_source,
                    layer_clipped_tail=clipped_tail, dead_norm=dead_norm, poisoned=poisoned,
                    curvature=curvature(run), spikes=spikes(run),
                    optimizer=optimizer_health(run, thresholds))


def global_health(run, all_steps, nonfinite_logged, overflows, thresholds):
    """The `GlobalHealth` of `run` (overflow steps already left out); `all_steps` are the
    logged steps before that, `nonfinite_logged` the logged steps with a NaN/inf raw gradient
    that were no overflow."""
    steps, norm = run[tags.global_norm(tags.RAW)]
    tail = series.window(len(steps), thresholds.tail_fraction)
    finite = norm[np.isfinite(norm)]
    peak, peak_step = series.peak(steps, norm)
    nonfinite = np.isin(steps, np.array(sorted(nonfinite_logged), dtype=np.int64))
    clipped = clipped_global(run, steps)
    transformed = run.get(tags.global_norm(tags.TRANSFORMED))
    overflow_count = len(overflows)
    if tags.OVERFLOW_STEPS in run:
        overflow_count = max(overflow_count, int(run[tags.OVERFLOW_STEPS][1][-1]))
    summary = GlobalHealth(
        first_step=int(all_steps[0]), last_step=int(all_steps[-1]), logged_steps=len(all_steps),
        final_norm=float(norm[-1]), peak_norm=peak, peak_step=peak_step,
        early_median_norm=series.finite_median(finite[:series.window(len(finite), thresholds.baseline_fraction)]),
        final_transformed_norm=None if transformed is None else float(transformed[1][-1]),
        clipped_share=None if clipped is None else float(np.mean(clipped)),
        tail_clipped_share=None if clipped is None else float(np.mean(clipped[-tail:])),
        nonfinite_steps=int(nonfinite.sum()),
        first_nonfinite_step=int(steps[nonfinite][0]) if nonfinite.any() else None,
        overflow_steps=overflow_count, excluded_steps=sorted(int(s) for s in overflows),
        final_loss_scale=(float(run[tags.LOSS_SCALE][1][-1]) if tags.LOSS_SCALE in run else None),
    )
    (summary.nonfinite_updates, summary.nonfinite_updates_since,
     summary.first_nonfinite_update_by) = nonfinite_updates(run)
    return summary


@dataclasses.dataclass
class VariableSeries:
    """The per-variable series a layer's row is made of, each `{variable path: (steps, values)}`."""

    raw_norms: dict
    transformed_norms: dict
    nonfinite: dict
    zero_fractions: dict
    rms: dict
    update_ratios: dict
    grad_to_weight: dict

    @classmethod
    def of(cls, run):
        raw = lambda stat: series.per_path(run, series.stat_prefix(tags.RAW, stat))  # noqa: E731
        return cls(raw_norms=raw("norm"),
                   transformed_norms=series.per_path(run, series.stat_prefix(tags.TRANSFORMED, "norm")),
                   nonfinite=raw("nonfinite"), zero_fractions=raw("zero_fraction"), rms=raw("rms"),
                   update_ratios=series.per_path(run, tags.update_ratio("")),
                   grad_to_weight=series.per_path(run, tags.grad_to_weight("")))


def measure_layers(run, grouping, summary, thresholds, had_nonfinite):
    """`(layers, clipping_source, layer_clipped_tail, dead_norm, poisoned)` (see `Measured`):
    one `LayerHealth` per layer of `grouping` whose variables were logged at a common step."""
    per_var = VariableSeries.of(run)
    raw_norms = per_var.raw_norms
    per_layer_clip = (summary.clipped_share is not None and bool(raw_norms)
                      and all(p in per_var.transformed_norms for p in raw_norms))
    clipping_source = ("none" if summary.clipped_share is None
                       else ("layer" if per_layer_clip else "global"))
    layers, clipped_tail, dead_norm, poisoned = [], {}, {}, {}
    for name, names in group_layers(raw_norms, grouping).items():
        lsteps, lnorm = series.layer_norm(raw_norms, names)
        if not len(lsteps):  # its variables were never logged at the same step
            continue
        ltail = series.window(len(lsteps), thresholds.tail_fraction)
        dead_norm[name] = bool(np.all(lnorm[-ltail:] == 0))
        share = summary.clipped_share
        if per_layer_clip:
            share, clipped_tail[name] = _layer_clipping(per_var, names, thresholds)
        _, g2w, update = series.layer_ratios(names, raw_norms, per_var.grad_to_weight,
                                             per_var.update_ratios)
        if had_nonfinite:
            poisoned[name] = poison_reason(lsteps, lnorm, update, g2w, ltail)
        lpeak, lpeak_step = series.peak(lsteps, lnorm)
        layers.append(LayerHealth(
            name=name, variables=list(names), final_norm=float(lnorm[-1]), peak_norm=lpeak,
            peak_step=lpeak_step, clipped_share=share,
            nonfinite_steps=_layer_nonfinite(per_var, names, summary),
            final_grad_to_weight=series.final(g2w), final_update_ratio=series.final(update),
            tail_update_ratio=_tail_update_ratio(update, thresholds),
            grad_to_weight_logged=g2w is not None, update_ratio_logged=update is not None,
            tail_zero_fraction=_layer_zeros(per_var, names, thresholds),
            zeros_judged=not any(is_embedding(p) for p in names),
        ))
    return layers, clipping_source, clipped_tail, dead_norm, poisoned


def _layer_clipping(per_var, names, thresholds):
    """`(share, tail share)` of a layer's logged steps in which its transformed norm was
    below its raw norm (by more than float32 rounding)."""
    _, rows = series.align([per_var.raw_norms[p] for p in names]
                           + [per_var.transformed_norms[p] for p in names])
    k = len(names)
    raw = np.sqrt(np.sum(rows[:k] ** 2, axis=0))
    transformed = np.sqrt(np.sum(rows[k:] ** 2, axis=0))
    clipped = transformed < raw * (1 - _CLIP_TOLERANCE)
    tail = series.window(len(raw), thresholds.tail_fraction)
    return float(np.mean(clipped)), float(np.mean(clipped[-tail:]))


def _layer_nonfinite(per_var, names, summary):
    """Logged steps in which a variable of the layer had a NaN/inf raw gradient entry (the
    global count when the per-variable counts were not logged)."""
    if not all(p in per_var.nonfinite for p in names):
        return summary.nonfinite_steps
    _, rows = series.align([per_var.nonfinite[p] for p in names])
    return int(np.sum(np.sum(rows, axis=0) > 0))


def _layer_zeros(per_var, names, thresholds):
    """The layer's mean share of exactly-zero gradient entries over the tail (variables
    weighted by size), or `None` when not logged."""
    if not all(p in per_var.zero_fractions for p in names):
        return None
    _, rows = series.align([per_var.zero_fractions[p] for p in names])
    sizes = series.variable_sizes(per_var.raw_norms, per_var.rms, names)
    weights = np.ones(len(names)) if sizes is None or not sizes.sum() > 0 else sizes
    per_step = weights @ rows / weights.sum()
    return float(np.mean(per_step[-series.window(len(per_step), thresholds.tail_fraction):]))


def _tail_update_ratio(update, thresholds):
    """The median of a layer's defined update ratios over the tail; `None` when none is."""
    if update is None:
        return None
    recent = update[-series.window(len(update), thresholds.tail_fraction):]
    return None if not np.isfinite(recent).any() else series.finite_median(recent)


def clipped_global(run, steps):
    """Boolean per step of `steps`: did clipping change the gradient? `None` without a transform."""
    signals = []
    if tags.CLIP_FRACTION in run:
        s, v = run[tags.CLIP_FRACTION]
        signals.append(dict(zip(s.tolist(), (v > 0).tolist())))
    if tags.CLIP_RATIO in run:
        s, v = run[tags.CLIP_RATIO]
        signals.append(dict(zip(s.tolist(), (v < 1 - _CLIP_TOLERANCE).tolist())))
    if not signals:
        return None
    return np.array([any(sig.get(int(step), False) for sig in signals) for step in steps])


def group_layers(paths, grouping):
    out = {}
    for path in paths:
        layer = path.rsplit("/", 1)[0] if grouping == "variable" and "/" in path else path
        out.setdefault(layer, []).append(path)
    return out


def is_embedding(path):
    return path.rsplit("/", 1)[-1] == _EMBEDDING_WEIGHT


def trend(steps_values):
    """A `Trend` of `(steps, values)`."""
    steps, values = steps_values
    peak, peak_step = series.peak(steps, values)
    return Trend(float(values[0]), float(values[-1]), peak, peak_step)


def nonfinite_steps(run):
    """`(counted, suspect)`: logged steps with NaN/inf raw gradient entries (the
    `gradients/raw/nonfinite` count, or a non-finite norm when no count was logged),
    and those plus the steps whose norm alone is non-finite (it overflows float32
    before its entries do)."""
    steps, norm = run[tags.global_norm(tags.RAW)]
    by_norm = set(steps[~np.isfinite(norm)].tolist())
    if tags.nonfinite_total(tags.RAW) not in run:
        return by_norm, by_norm
    s, v = run[tags.nonfinite_total(tags.RAW)]
    counted = set(s[v > 0].tolist())
    return counted, counted | by_norm


def nonfinite_updates(run):
    """`(count, since, by)` from `gradients/nonfinite_steps` (counted at every step, logged or
    not): the count, and the logged steps between which the first happened (`since` is 0
    when it came before the first logged step); `(None, None, None)` for runs before that tag."""
    if tags.NONFINITE_STEPS not in run or not len(run[tags.NONFINITE_STEPS][0]):
        return None, None, None
    s, count = run[tags.NONFINITE_STEPS]
    rose = np.flatnonzero(count > 0)
    if not len(rose):
        return 0, None, None
    first = int(rose[0])
    return int(np.nanmax(count)), int(s[first - 1]) if first else 0, int(s[first])


def poison_reason(lsteps, lnorm, update, g2w, tail_steps):
    """Why a layer's weights are NaN/inf over its last `tail_steps` logged steps, or `None`:
    its gradient norm is NaN/inf there, or its update ratio / grad-to-weight ratio is undefined
    there (a weight norm of NaN/inf; a layer of all-zero weights reads the same, which is why
    this is asked only of runs with non-finite updates)."""
    if not len(lsteps):
        return None
    tail = slice(-tail_steps, None)
    if not np.isfinite(lnorm[tail]).any():
        return "gradient norm NaN/inf"
    for name, ratio in (("update ratio", update), ("grad/weight", g2w)):
        if ratio is not None and len(ratio) and np.isnan(ratio[-min(tail_steps, len(ratio)):]).all():
            zero = " (its zero gradient is ReLU(NaN) = 0, not dead units)" if np.all(lnorm[tail] == 0) else ""
            return f"{name} undefined, weight norm NaN/inf{zero}"
    return None


def overflow_steps(run, bad):
    """The steps of `bad` that were loss-scale overflows: `gradients/overflow_steps` rose at
    the step, or `gradients/loss_scale` fell there from a value above 1."""
    out = set()
    if tags.OVERFLOW_STEPS in run:
        s, count = run[tags.OVERFLOW_STEPS]
        rose = np.diff(count, prepend=0.0) > 0
        out |= bad & set(s[rose].tolist())
    if tags.LOSS_SCALE in run:
        s, scale = run[tags.LOSS_SCALE]
        for step in sorted(bad - out):
            j = int(np.searchsorted(s, step, side="right")) - 1  # last scale at or before it
            if j < 0:
                continue
            fell_here = s[j] == step and j >= 1 and scale[j] < scale[j - 1] and scale[j - 1] > 1
            fell_next = j + 1 < len(s) and scale[j + 1] < scale[j] and scale[j] > 1
            if fell_here or fell_next:
                out.add(step)
    return out


def without_steps(run, steps):
    """`run` with the gradient statistics of `steps` left out (bookkeeping tags kept)."""
    if not steps:
        return run
    drop = np.array(sorted(steps), dtype=np.int64)
    out = {}
    for tag, (s, v) in run.items():
        if tag.startswith("gradients/") and tag not in _BOOKKEEPING:
            keep = ~np.isin(s, drop)
            s, v = s[keep], v[keep]
        out[tag] = (s, v)
    return out


# Names Keras gives variables (the last component of a variable's path): a run that recorded


_VARIABLE_NAMES = frozenset({
    "kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance", "embeddings",
    "recurrent_kernel", "depthwise_kernel", "pointwise_kernel", "alpha", "scale", "offset",
    "lora_kernel_a", "lora_kernel_b", "kernel_scale", "bias_scale", "mean", "variance"})


def infer_grouping(labels):
    """The grouping a run's group labels were written with, for a run that recorded none.

    Under `grouping="variable"` a label is a variable path, ending in the
    variable's name (`dense/kernel`); under `"layer"` a layer path (`model/dense`).
    `"variable"` when at least half the labels with a `/` end in a name Keras
    gives variables (`kernel`, `bias`, `gamma`, `embeddings`, ...), else
    `"layer"` (labels without a `/` are the same rows either way).
    """
    votes = [label.rsplit("/", 1)[1] in _VARIABLE_NAMES for label in labels if "/" in label]
    return "variable" if votes and 2 * sum(votes) >= len(votes) else "layer"


def observer_run(run, name=None):
    """The series of one observer of `run`, as a `Run` of unprefixed tags.

    Args:
        run: `{tag: (steps, values)}` as returned by `load_run`.
        name: the observer's `name=`; `None` for the unnamed observer (the
            tags of no named observer). Defaults to `None`.

    Returns:
        A `Run`: for a named observer its tags `name/...` without the prefix
        (and the run's Hessian tags when it is the run's only observer); its
        recorded configuration, the run's `problems`, the `overlaps` of its
        series.
    """
    names = [n for n in observer_names(run) if n is not None]
    if name is None:
        prefixes = tuple(f"{n}/" for n in names)
        mine = {t: v for t, v in run.items() if not (prefixes and t.startswith(prefixes))}
    else:
        prefix = f"{name}/"
        mine = {t[len(prefix):]: v for t, v in run.items() if t.startswith(prefix)}
        if observer_names(run) == [name]:  # the model's curvature, beside its only optimizer
            mine.update({t: v for t, v in run.items() if t.startswith("hessian/")})
    configs = dict(getattr(run, "configs", {}) or {})
    if None not in configs and getattr(run, "config", None):
        configs[None] = run.config
    return Run(mine, problems=getattr(run, "problems", []), config=configs.get(name),
               overlaps=[o for o in getattr(run, "overlaps", []) if o.name == name])


def _optional_trend(run, tag):
    return trend(run[tag]) if tag in run and len(run[tag][0]) else None


def curvature(run):
    """A `Curvature` from the Hessian tags, or `None` when the run has no Hessian probe."""
    probes = [run[t][0] for t in (tags.eigenvalue(1), tags.preconditioned_eigenvalue(1)) if t in run]
    if not probes:
        return None
    steps = np.union1d(*probes) if len(probes) == 2 else probes[0]
    layers = {tag[len(tags.LAYER_EIGENVALUE_PREFIX):]: float(values[-1])
              for tag, (_, values) in run.items() if tag.startswith(tags.LAYER_EIGENVALUE_PREFIX)}
    return Curvature(
        probes=len(steps), first_step=int(steps[0]), last_step=int(steps[-1]),
        eigenvalue=_optional_trend(run, tags.eigenvalue(1)),
        edge_of_stability=_optional_trend(run, tags.EDGE_OF_STABILITY),
        edge_of_stability_meaning=(OPTIMIZER_EDGE if any(t in run for t in _NEW_EDGE_TAGS)
                                   else GD_EDGE),
        gd_edge_of_stability=_optional_trend(run, tags.GD_EDGE_OF_STABILITY),
        preconditioned_eigenvalue=_optional_trend(run, tags.preconditioned_eigenvalue(1)),
        stability_threshold=_optional_trend(run, tags.STABILITY_THRESHOLD),
        gradient_overlap=_optional_trend(run, tags.GRADIENT_OVERLAP),
        layer_eigenvalues=dict(sorted(layers.items(), key=lambda kv: -kv[1])),
        edge_of_stability_on=_edge_sharpness(run),
    )


def spikes(run):
    """A `Spikes` from `gradients/spike/at` and `gradients/spike/count`, or `None` (not logged)."""
    if tags.SPIKE_AT not in run and tags.SPIKE_COUNT not in run:
        return None
    steps, zscores = run[tags.SPIKE_AT] if tags.SPIKE_AT in run else (np.zeros(0, np.int64), np.zeros(0))
    known = np.isfinite(zscores)  # NaN z-scores last
    order = sorted(range(len(steps)), key=lambda i: (not known[i], -zscores[i] if known[i] else 0.0,
                                                     steps[i]))
    count = len(steps)
    if tags.SPIKE_COUNT in run:
        count = max(count, int(np.nanmax(run[tags.SPIKE_COUNT][1], initial=0)))
    return Spikes(count=count, steps=[int(steps[i]) for i in order],
                  zscores=[float(zscores[i]) for i in order])


def _tail_median(run, tag, thresholds):
    if tag not in run:
        return None
    values = run[tag][1]
    value = series.finite_median(values[-series.window(len(values), thresholds.tail_fraction):])
    return value if math.isfinite(value) else None


def optimizer_health(run, thresholds):
    if tags.COSINE_UPDATE_GRADIENT not in run and tags.COSINE_GRADIENT_FIRST_MOMENT not in run:
        return None
    return OptimizerHealth(
        cosine_update_gradient=_tail_median(run, tags.COSINE_UPDATE_GRADIENT, thresholds),
        cosine_gradient_first_moment=_tail_median(run, tags.COSINE_GRADIENT_FIRST_MOMENT, thresholds))


def _edge_sharpness(run):
    """`"lambda_1(P^-1 H)"` or `"lambda_1(H)"`: the sharpness whose ratio to the threshold
    `hessian/edge_of_stability` is (the nearer at the last probe holding all three), or `None`."""
    if tags.EDGE_OF_STABILITY not in run or tags.STABILITY_THRESHOLD not in run:
        return None
    candidates = [(name, tag) for name, tag in (("lambda_1(P^-1 H)", tags.preconditioned_eigenvalue(1)),
                                                ("lambda_1(H)", tags.eigenvalue(1))) if tag in run]
    ratios = [run[tags.EDGE_OF_STABILITY], run[tags.STABILITY_THRESHOLD]] + [run[t] for _, t in candidates]
    steps, rows = series.align(ratios)
    if not candidates or not len(steps):
        return None
    edge, threshold = rows[0, -1], rows[1, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        misses = [abs(sharpness[-1] / threshold - edge) for sharpness in rows[2:]]
    return candidates[int(np.nanargmin(misses))][0] if np.isfinite(misses).any() else None
