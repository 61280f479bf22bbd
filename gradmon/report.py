"""Health report of a gradmon run: the numbers and flags behind `gradmon summary LOGDIR`.

Reading, judging and drawing are separate steps:

- `load_run(logdir)` reads the scalar series of a run's event files with
  TensorBoard's own reader.
- `health_report(run)` turns them into a `HealthReport`: per-layer numbers,
  the curvature trend, and flags.
- `format_table`, `to_json` and `plot` display a report; `add_arguments` and
  `run_command` are the `gradmon summary` command line.

Rows are layers. A layer is a logged variable path minus its last component
(`model/dense/kernel` and `model/dense/bias` are the layer `model/dense`); its
gradient norm at a step is sqrt(sum of its variables' squared norms), i.e. the
norm of the layer's gradient as one vector. For a run monitored with
`grouping="layer"` the logged groups already are layers: pass
`grouping="layer"` (`--grouping layer`) so that each group is its own row.

Per-layer columns:

- final / peak norm: the raw (untransformed) gradient norm at the last logged
  step, and its largest value (NaN steps ignored; inf counts).
- clipped: share of logged steps in which clipping changed the gradient.
  Per layer when the transformed per-variable norms were logged (the layer's
  transformed norm is below its raw norm by more than a relative 1e-6);
  otherwise the global signal for every layer: `gradients/clip/fraction` > 0 or
  `gradients/clip/ratio` < 1 - 1e-6. "-" when the run logged no transform.
- non-finite: number of logged steps in which the layer's raw gradient had a
  NaN or inf entry (its per-variable `nonfinite` counts when logged, else the
  global `gradients/raw/nonfinite` count).
- update ratio: ||w_after - w_before|| / ||w_before|| of the whole layer at the
  last step, from the per-variable update ratios weighted by the variables'
  weight norms (recovered as norm / grad_to_weight); when a weight norm cannot
  be recovered (a zero gradient, or grad_to_weight not logged) it is the plain
  mean of the variables' update ratios.
- zeros: mean share of exactly-zero gradient entries over the last
  `tail_fraction` of steps (variables weighted by size, recovered as
  (norm / rms)^2; equal weights when a size cannot be recovered).

Flags (thresholds are the fields of `Thresholds`; "early" steps are the first
`baseline_fraction` of logged steps, the "tail" the last `tail_fraction`, each
at least one step):

- exploding (global): the global raw gradient norm's final or peak value
  exceeds `explode_factor` (default 100) times its median over the early
  steps, or any logged step had a NaN/inf raw gradient entry.
- vanishing (per layer): the layer's final raw norm is below `vanish_ratio`
  (default 1e-3) times the largest layer's final norm. Dead layers are reported
  as dead only.
- dead (per layer): the layer's zeros share over the tail is at least
  `dead_zero_fraction` (default 0.99), or its norm is exactly 0 at every tail
  step.
- clipping (global): clipping changed the gradient in at least `clip_share`
  (default 0.5) of the tail steps (global signal above); the detail lists the
  layers clipped that often when per-layer norms are known.
- edge_of_stability (global): lr * lambda_1 / 2 (`hessian/edge_of_stability`)
  exceeds `edge_of_stability` (default 1.1) at every Hessian probe in the last
  `tail_fraction` of probes. Above 1, plain gradient descent with this
  learning rate is unstable along the top Hessian eigenvector.
"""

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
import typing

import numpy as np

from gradmon import tags
from gradmon._validation import check_choice, invalid


GROUPINGS = ("variable", "layer")

EXPLODING = "exploding"
VANISHING = "vanishing"
DEAD = "dead"
CLIPPING = "clipping"
EDGE_OF_STABILITY = "edge_of_stability"

_EXPLANATIONS = {
    EXPLODING: "the gradient norm blew up or became NaN/inf: lower the learning rate, "
               "clip gradients, check the data and loss for inf/NaN.",
    VANISHING: "this layer's gradient is orders of magnitude smaller than the largest "
               "layer's: it barely learns (saturation, bad init or scaling).",
    DEAD: "this layer's gradient is (almost) all exact zeros: dead ReLUs, a cut graph "
          "or a zeroed branch; it does not learn.",
    CLIPPING: "clipping rewrites most steps: the effective step size is set by the "
              "clip threshold, not the learning rate; raise max_norm or lower the lr.",
    EDGE_OF_STABILITY: "lr * lambda_1 / 2 > 1: gradient descent is unstable along the "
                       "sharpest direction (edge of stability); expect oscillating loss.",
}

_CLIP_TOLERANCE = 1e-6  # relative: float32 rounding is not clipping
_PNG_NEEDS_MATPLOTLIB = "gradmon summary --png needs matplotlib: pip install matplotlib"


class NoGradmonLogs(ValueError):
    """The directory holds no event files written by `gradmon.GradientMonitor`."""


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Thresholds of `health_report`'s flags (see the module docstring).

    Args:
        explode_factor: exploding when the global raw norm's final or peak
            value exceeds this times its early median. Defaults to `100.0`.
        vanish_ratio: vanishing when a layer's final norm is below this times
            the largest layer's final norm. Defaults to `1e-3`.
        dead_zero_fraction: dead when a layer's mean zero-entry share over the
            tail is at least this. Defaults to `0.99`.
        clip_share: persistent clipping when at least this share of tail
            steps was clipped. Defaults to `0.5`.
        edge_of_stability: past the edge when lr * lambda_1 / 2 exceeds this
            at every tail Hessian probe. Defaults to `1.1`.
        tail_fraction: the tail is this last share of logged steps (and of
            Hessian probes). Defaults to `0.2`.
        baseline_fraction: the early steps are this first share of logged
            steps. Defaults to `0.1`.
    """

    explode_factor: float = 100.0
    vanish_ratio: float = 1e-3
    dead_zero_fraction: float = 0.99
    clip_share: float = 0.5
    edge_of_stability: float = 1.1
    tail_fraction: float = 0.2
    baseline_fraction: float = 0.1

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            share = field.name in ("dead_zero_fraction", "clip_share", "tail_fraction",
                                   "baseline_fraction")
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and value > 0 and (not share or value <= 1))
            if not ok:
                raise invalid(field.name, "a number in (0, 1]" if share else
                              "a positive finite number", value)


@dataclasses.dataclass
class LayerHealth:
    """One layer's row of the report (see the module docstring for each column)."""

    name: str
    variables: typing.List[str]
    final_norm: float
    peak_norm: float
    peak_step: typing.Optional[int]
    clipped_share: typing.Optional[float]
    nonfinite_steps: int
    final_update_ratio: typing.Optional[float]
    tail_zero_fraction: typing.Optional[float]


@dataclasses.dataclass
class GlobalHealth:
    """Whole-model numbers, from the global tags."""

    first_step: int
    last_step: int
    logged_steps: int
    final_norm: float
    peak_norm: float
    peak_step: typing.Optional[int]
    early_median_norm: float
    final_transformed_norm: typing.Optional[float]
    clipped_share: typing.Optional[float]
    tail_clipped_share: typing.Optional[float]
    nonfinite_steps: int
    first_nonfinite_step: typing.Optional[int]


@dataclasses.dataclass
class Trend:
    """First, last and largest value of a series, and where the largest is."""

    first: float
    last: float
    max: float
    max_step: typing.Optional[int]


@dataclasses.dataclass
class Curvature:
    """Top Hessian eigenvalue and lr * lambda_1 / 2 over the Hessian probes."""

    probes: int
    first_step: int
    last_step: int
    eigenvalue: Trend
    edge_of_stability: typing.Optional[Trend]


@dataclasses.dataclass
class Flag:
    """A problem found: `kind` (e.g. `"exploding"`), what it concerns, the evidence."""

    kind: str
    subject: str
    detail: str

    @property
    def explanation(self):
        return _EXPLANATIONS[self.kind]


@dataclasses.dataclass
class HealthReport:
    """What `health_report` returns; `clipping_source` is `"layer"`, `"global"` or `"none"`."""

    summary: GlobalHealth
    layers: typing.List[LayerHealth]
    curvature: typing.Optional[Curvature]
    flags: typing.List[Flag]
    clipping_source: str
    thresholds: Thresholds


# -- reading -------------------------------------------------------------------


def run_directory(logdir):
    """`logdir/train` when it exists (a `GradientMonitor(log_dir)` root), else `logdir`."""
    train = os.path.join(str(logdir), "train")
    return train if os.path.isdir(train) else str(logdir)


def load_run(logdir):
    """Reads the scalar series of a run with TensorBoard's event-file reader.

    Args:
        logdir: the `log_dir` given to `gradmon.GradientMonitor`, or its
            `train` subdirectory.

    Returns:
        `{tag: (steps, values)}`: int64 and float64 numpy arrays sorted by
        step, for every scalar summary in the event files (non-scalar
        summaries such as histograms are skipped). When a step was written more
        than once, the last value written wins (files in name order, which is
        creation order).

    Raises:
        NoGradmonLogs: when the directory holds no event files.
    """
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat.proto import types_pb2
    from tensorboard.util import tensor_util

    directory = run_directory(logdir)
    if not os.path.isdir(directory):
        raise NoGradmonLogs(
            f"{directory!r} is not a directory. Expected the `log_dir` of a "
            "gradmon.GradientMonitor run (event files under LOGDIR/train)."
        )
    paths = sorted(glob.glob(os.path.join(glob.escape(directory), "events.out.tfevents.*")))
    if not paths:
        raise NoGradmonLogs(
            f"No event files in {directory!r}. Expected the `log_dir` of a "
            "gradmon.GradientMonitor run (event files under LOGDIR/train)."
        )
    values = {}
    for path in paths:
        for event in event_file_loader.EventFileLoader(path).Load():
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                number = _scalar(value, tensor_util, types_pb2)
                if number is not None:
                    values.setdefault(value.tag, {})[int(event.step)] = number
    out = {}
    for tag, by_step in values.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps], dtype=np.float64))
    return out


def _scalar(value, tensor_util, types_pb2):
    if value.HasField("tensor"):
        tensor = value.tensor
        if tensor.tensor_shape.dim or tensor.dtype == types_pb2.DT_STRING:
            return None
        try:
            return float(tensor_util.make_ndarray(tensor))
        except (TypeError, ValueError):
            return None
    if value.WhichOne("value") == "simple_value":
        return float(value.simple_value)
    return None


def is_gradmon_run(run):
    """Whether a `load_run` result holds gradmon's gradient statistics."""
    return tags.global_norm(tags.RAW) in run


# -- judging -------------------------------------------------------------------


def _per_path(run, prefix):
    """`{path: series}` for the per-variable tags `prefix + path`, in logged order."""
    return {tag[len(prefix):]: series for tag, series in run.items()
            if tag.startswith(prefix) and len(tag) > len(prefix)}


def _stat_prefix(kind, stat):
    return tags.group_stat(kind, stat, "")


def _align(series_list):
    """`(steps, [len(series_list), len(steps)])` over the steps every series has."""
    steps = series_list[0][0]
    for s, _ in series_list[1:]:
        steps = np.intersect1d(steps, s)
    rows = [values[np.searchsorted(s, steps)] for s, values in series_list]
    return steps, np.array(rows, dtype=np.float64).reshape(len(series_list), len(steps))


def _window(n, fraction):
    return max(1, math.ceil(fraction * n - 1e-9))


def _peak(steps, values):
    """Largest value ignoring NaN (inf counts) and its step; NaN, None when all NaN."""
    known = ~np.isnan(values)
    if not known.any():
        return float("nan"), None
    i = np.flatnonzero(known)[np.argmax(values[known])]
    return float(values[i]), int(steps[i])


def _clipped_global(run, steps):
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


def _layer_norm(series_by_var, names):
    steps, rows = _align([series_by_var[n] for n in names])
    return steps, np.sqrt(np.sum(rows**2, axis=0))


def _sizes(norms, rms, names):
    """Entries per variable from (norm / rms)^2, or `None` when one cannot be recovered."""
    sizes = []
    for name in names:
        if name not in rms:
            return None
        _, (n, r) = _align([norms[name], rms[name]])
        ok = np.isfinite(n) & np.isfinite(r) & (r > 0) & (n > 0)
        if not ok.any():
            return None
        sizes.append(round(float((n[ok][0] / r[ok][0]) ** 2)))
    return np.array(sizes, dtype=np.float64)


def _update_ratio(ratios, norms, g2w, names):
    """The layer's final update ratio (module docstring), or `None` when not logged."""
    if any(n not in ratios for n in names):
        return None
    if all(n in g2w for n in names):
        _, rows = _align([ratios[n] for n in names] + [norms[n] for n in names]
                         + [g2w[n] for n in names])
        k = len(names)
        u, g, q = rows[:k, -1], rows[k:2 * k, -1], rows[2 * k:, -1]
        if np.all(np.isfinite(g) & np.isfinite(q) & (q > 0)):
            w = g / q
            return float(np.sqrt(np.sum((u * w) ** 2)) / np.sqrt(np.sum(w**2)))
    _, rows = _align([ratios[n] for n in names])
    return float(np.mean(rows[:, -1]))


def _layers(paths, grouping):
    out = {}
    for path in paths:
        layer = path.rsplit("/", 1)[0] if grouping == "variable" and "/" in path else path
        out.setdefault(layer, []).append(path)
    return out


def _nanmedian(values):
    return float("nan") if np.isnan(values).all() else float(np.nanmedian(values))


def _trend(series):
    steps, values = series
    peak, peak_step = _peak(steps, values)
    return Trend(float(values[0]), float(values[-1]), peak, peak_step)


def health_report(run, thresholds=None, grouping="variable"):
    """Judges a run's gradient health.

    Args:
        run: `{tag: (steps, values)}` as returned by `load_run`.
        thresholds: a `Thresholds`, or `None` for the defaults.
            Defaults to `None`.
        grouping: the `grouping` the run was monitored with: `"variable"`
            (rows are layers, i.e. variable paths minus their last component)
            or `"layer"` (each logged group is a row). Defaults to `"variable"`.

    Returns:
        A `HealthReport`.

    Raises:
        NoGradmonLogs: when `run` has no gradmon gradient statistics.
    """
    thresholds = Thresholds() if thresholds is None else thresholds
    check_choice("grouping", grouping, GROUPINGS)
    if not is_gradmon_run(run):
        raise NoGradmonLogs(
            f"No gradmon statistics in this run (no `{tags.global_norm(tags.RAW)}` tag). "
            "Expected the `log_dir` of a gradmon.GradientMonitor run."
        )
    steps, norm = run[tags.global_norm(tags.RAW)]
    n = len(steps)
    tail, early = _window(n, thresholds.tail_fraction), _window(n, thresholds.baseline_fraction)
    peak, peak_step = _peak(steps, norm)

    nonfinite = np.zeros(n, dtype=bool)
    if tags.nonfinite_total(tags.RAW) in run:
        s, v = run[tags.nonfinite_total(tags.RAW)]
        bad = set(s[v > 0].tolist())
        nonfinite = np.array([int(step) in bad for step in steps])
    clipped = _clipped_global(run, steps)
    transformed = run.get(tags.global_norm(tags.TRANSFORMED))
    summary = GlobalHealth(
        first_step=int(steps[0]), last_step=int(steps[-1]), logged_steps=n,
        final_norm=float(norm[-1]), peak_norm=peak, peak_step=peak_step,
        early_median_norm=_nanmedian(norm[:early]),
        final_transformed_norm=None if transformed is None else float(transformed[1][-1]),
        clipped_share=None if clipped is None else float(np.mean(clipped)),
        tail_clipped_share=None if clipped is None else float(np.mean(clipped[-tail:])),
        nonfinite_steps=int(nonfinite.sum()),
        first_nonfinite_step=int(steps[nonfinite][0]) if nonfinite.any() else None,
    )

    raw_norms = _per_path(run, _stat_prefix(tags.RAW, "norm"))
    obs_norms = _per_path(run, _stat_prefix(tags.TRANSFORMED, "norm"))
    raw_nonfinite = _per_path(run, _stat_prefix(tags.RAW, "nonfinite"))
    zero_fractions = _per_path(run, _stat_prefix(tags.RAW, "zero_fraction"))
    raw_rms = _per_path(run, _stat_prefix(tags.RAW, "rms"))
    update_ratios = _per_path(run, tags.update_ratio(""))
    grad_to_weight = _per_path(run, tags.grad_to_weight(""))
    per_layer_clip = clipped is not None and bool(raw_norms) and all(p in obs_norms for p in raw_norms)
    clipping_source = "none" if clipped is None else ("layer" if per_layer_clip else "global")

    layers, layer_clipped_tail, dead_norm = [], {}, {}
    for name, names in _layers(raw_norms, grouping).items():
        lsteps, lnorm = _layer_norm(raw_norms, names)
        if not len(lsteps):  # its variables were never logged at the same step
            continue
        lpeak, lpeak_step = _peak(lsteps, lnorm)
        ltail = _window(len(lsteps), thresholds.tail_fraction)
        dead_norm[name] = bool(np.all(lnorm[-ltail:] == 0))
        if per_layer_clip:
            _, rows = _align([raw_norms[p] for p in names] + [obs_norms[p] for p in names])
            k = len(names)
            r = np.sqrt(np.sum(rows[:k] ** 2, axis=0))
            t = np.sqrt(np.sum(rows[k:] ** 2, axis=0))
            lclipped = t < r * (1 - _CLIP_TOLERANCE)
            share = float(np.mean(lclipped))
            layer_clipped_tail[name] = float(np.mean(lclipped[-_window(len(r), thresholds.tail_fraction):]))
        else:
            share = summary.clipped_share
        if all(p in raw_nonfinite for p in names):
            _, rows = _align([raw_nonfinite[p] for p in names])
            lnonfinite = int(np.sum(np.sum(rows, axis=0) > 0))
        else:
            lnonfinite = summary.nonfinite_steps
        zeros = None
        if all(p in zero_fractions for p in names):
            _, rows = _align([zero_fractions[p] for p in names])
            sizes = _sizes(raw_norms, raw_rms, names)
            weights = np.ones(len(names)) if sizes is None else sizes
            per_step = weights @ rows / weights.sum()
            zeros = float(np.mean(per_step[-_window(len(per_step), thresholds.tail_fraction):]))
        layers.append(LayerHealth(
            name=name, variables=list(names), final_norm=float(lnorm[-1]), peak_norm=lpeak,
            peak_step=lpeak_step, clipped_share=share, nonfinite_steps=lnonfinite,
            final_update_ratio=_update_ratio(update_ratios, raw_norms, grad_to_weight, names),
            tail_zero_fraction=zeros,
        ))

    curvature = None
    if tags.eigenvalue(1) in run:
        eig_steps = run[tags.eigenvalue(1)][0]
        eos = run.get(tags.EDGE_OF_STABILITY)
        curvature = Curvature(
            probes=len(eig_steps), first_step=int(eig_steps[0]), last_step=int(eig_steps[-1]),
            eigenvalue=_trend(run[tags.eigenvalue(1)]),
            edge_of_stability=None if eos is None else _trend(eos),
        )

    flags = _flags(summary, layers, thresholds, layer_clipped_tail, dead_norm, run)
    return HealthReport(summary=summary, layers=layers, curvature=curvature, flags=flags,
                        clipping_source=clipping_source, thresholds=thresholds)


def _flags(summary, layers, thresholds, layer_clipped_tail, dead_norm, run):
    flags = []
    limit = thresholds.explode_factor * summary.early_median_norm
    blown = [label for label, value in (("final", summary.final_norm), ("peak", summary.peak_norm))
             if math.isfinite(limit) and limit > 0 and value > limit]
    if blown or summary.nonfinite_steps:
        parts = []
        if blown:
            parts.append(f"raw global norm {_num(summary.peak_norm)} peak (step "
                         f"{summary.peak_step}), {_num(summary.final_norm)} final: above "
                         f"{_num(thresholds.explode_factor)} x early median "
                         f"{_num(summary.early_median_norm)}")
        if summary.nonfinite_steps:
            parts.append(f"{summary.nonfinite_steps} step(s) with NaN/inf gradients, first at "
                         f"step {summary.first_nonfinite_step}")
        flags.append(Flag(EXPLODING, "global", "; ".join(parts)))

    dead = set()
    for layer in layers:
        zeros = layer.tail_zero_fraction
        if dead_norm[layer.name] or (zeros is not None and zeros >= thresholds.dead_zero_fraction):
            dead.add(layer.name)
            why = ("norm exactly 0" if dead_norm[layer.name]
                   else f"{zeros:.1%} of gradient entries exactly 0")
            flags.append(Flag(DEAD, layer.name,
                              f"{why} over the last {_pct(thresholds.tail_fraction)} of steps"))
    finals = [l.final_norm for l in layers if math.isfinite(l.final_norm)]
    reference = max(finals, default=float("nan"))
    if math.isfinite(reference) and reference > 0:
        for layer in layers:
            if layer.name not in dead and layer.final_norm < thresholds.vanish_ratio * reference:
                flags.append(Flag(VANISHING, layer.name,
                                  f"final norm {_num(layer.final_norm)} < "
                                  f"{_num(thresholds.vanish_ratio)} x largest layer's "
                                  f"{_num(reference)}"))

    share = summary.tail_clipped_share
    if share is not None and share >= thresholds.clip_share:
        detail = (f"{share:.0%} of the last {_pct(thresholds.tail_fraction)} of steps clipped "
                  f"(threshold {_pct(thresholds.clip_share)})")
        often = [name for name, s in layer_clipped_tail.items() if s >= thresholds.clip_share]
        if layer_clipped_tail:
            detail += f"; layers clipped that often: {', '.join(often) or 'none'}"
        flags.append(Flag(CLIPPING, "global", detail))

    if tags.EDGE_OF_STABILITY in run:
        _, eos = run[tags.EDGE_OF_STABILITY]
        tail = eos[-_window(len(eos), thresholds.tail_fraction):]
        if np.all(tail > thresholds.edge_of_stability):
            flags.append(Flag(EDGE_OF_STABILITY, "global",
                              f"lr * lambda_1 / 2 between {_num(tail.min())} and "
                              f"{_num(tail.max())} at the last {len(tail)} Hessian probe(s) "
                              f"(threshold {_num(thresholds.edge_of_stability)})"))
    return flags


# -- displaying ----------------------------------------------------------------


def _num(x):
    if x is None:
        return "-"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _pct(x):
    return "-" if x is None else f"{x:.0%}"


def _rows_text(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(row):  # first column left-aligned, numbers right-aligned
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return [line(header)] + [line(r) for r in rows]


def format_table(report):
    """The report as plain text: layer rows, curvature, then flags with explanations."""
    s = report.summary
    out = [f"gradmon health report: steps {s.first_step}-{s.last_step} "
           f"({s.logged_steps} logged)", ""]
    header = ["layer", "final norm", "peak norm", "peak step", "clipped", "non-finite",
              "update ratio", "zeros"]
    rows = [[l.name, _num(l.final_norm), _num(l.peak_norm), _num(l.peak_step),
             _pct(l.clipped_share), str(l.nonfinite_steps), _num(l.final_update_ratio),
             _pct(l.tail_zero_fraction)] for l in report.layers]
    rows.append(["(global)", _num(s.final_norm), _num(s.peak_norm), _num(s.peak_step),
                 _pct(s.clipped_share), str(s.nonfinite_steps), "", ""])
    out += _rows_text(header, rows)
    source = {"layer": "per layer, transformed vs raw norms",
              "global": "global clip ratio / fraction",
              "none": "no transform logged"}[report.clipping_source]
    out += ["", f"norms: raw gradient L2; early median {_num(s.early_median_norm)}; "
                f"clipped: {source}; zeros: mean over the last "
                f"{_pct(report.thresholds.tail_fraction)} of steps"]
    c = report.curvature
    if c is not None:
        out += ["", f"curvature: {c.probes} Hessian probe(s), steps {c.first_step}-{c.last_step}"]
        rows = [["lambda_1", _num(c.eigenvalue.first), _num(c.eigenvalue.last),
                 _num(c.eigenvalue.max)]]
        if c.edge_of_stability is not None:
            e = c.edge_of_stability
            rows.append(["lr*lambda_1/2", _num(e.first), _num(e.last), _num(e.max)])
        out += _rows_text(["", "first", "last", "max"], rows)
    out += [""]
    if not report.flags:
        out.append("flags: none")
    else:
        out.append("flags:")
        for f in report.flags:
            out.append(f"  {f.kind.upper()} [{f.subject}] {f.detail}")
            out.append(f"    {f.explanation}")
    return "\n".join(out)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        x = float(x)
        return x if math.isfinite(x) else str(x)  # "nan", "inf": strict JSON has neither
    if isinstance(x, np.integer):
        return int(x)
    return x


def to_json(report):
    """The report as plain dicts and lists; non-finite numbers become "nan"/"inf"/"-inf"."""
    out = dataclasses.asdict(report)
    out["flags"] = [dict(dataclasses.asdict(f), explanation=f.explanation) for f in report.flags]
    return _jsonable(out)


def _finite_positive(values):
    values = np.asarray(values, dtype=np.float64).copy()
    values[~np.isfinite(values) | (values <= 0)] = np.nan
    return values


def plot(run, report, path):
    """Draws the key curves of `run` into a PNG at `path`.

    Global raw and transformed norms (log scale, NaN/inf steps marked), the
    clip ratio, per-layer norms (log scale), and lambda_1 and lr * lambda_1 / 2
    when the run has them. Uses matplotlib's Agg canvas without touching
    pyplot's global state.

    Raises:
        ImportError: when matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(_PNG_NEEDS_MATPLOTLIB) from error

    panels = ["norms"]
    if tags.CLIP_RATIO in run:
        panels.append("clip")
    if report.layers:
        panels.append("layers")
    if tags.eigenvalue(1) in run:
        panels.append("curvature")
    fig = Figure(figsize=(9, 2.6 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels):
        if panel == "norms":
            for kind in tags.KINDS:
                if tags.global_norm(kind) in run:
                    steps, values = run[tags.global_norm(kind)]
                    ax.plot(steps, _finite_positive(values), label=f"{kind} global norm")
            steps, values = run[tags.global_norm(tags.RAW)]
            bad = steps[~np.isfinite(values)]
            if tags.nonfinite_total(tags.RAW) in run:
                s, v = run[tags.nonfinite_total(tags.RAW)]
                bad = np.union1d(bad, s[v > 0])
            if len(bad):
                ax.vlines(bad, 0, 1, transform=ax.get_xaxis_transform(), colors="red",
                          alpha=0.3, label="NaN/inf gradient")
            ax.set_yscale("log")
            ax.set_title("gradient norm")
        elif panel == "clip":
            steps, values = run[tags.CLIP_RATIO]
            ax.plot(steps, values, color="tab:orange")
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ax.set_title("clip ratio ||transformed|| / ||raw|| (1 = untouched)")
        elif panel == "layers":
            raw_norms = _per_path(run, _stat_prefix(tags.RAW, "norm"))
            for layer in report.layers:
                steps, values = _layer_norm(raw_norms, layer.variables)
                ax.plot(steps, _finite_positive(values), label=layer.name)
            ax.set_yscale("log")
            ax.set_title("raw gradient norm per layer")
        else:
            steps, values = run[tags.eigenvalue(1)]
            ax.plot(steps, values, marker=".", label="lambda_1")
            ax.set_title("top Hessian eigenvalue")
            if tags.EDGE_OF_STABILITY in run:
                twin = ax.twinx()
                steps, values = run[tags.EDGE_OF_STABILITY]
                twin.plot(steps, values, marker=".", color="tab:red", label="lr*lambda_1/2")
                twin.axhline(1.0, color="tab:red", lw=0.8, ls="--")
                twin.set_ylabel("lr * lambda_1 / 2")
                ax.set_title("top Hessian eigenvalue and edge of stability (dashed: 1)")
        if ax.get_legend_handles_labels()[0] and panel != "curvature":
            ax.legend(fontsize="small", loc="best")
    axes[-1].set_xlabel("step")
    fig.savefig(path, format="png", dpi=100)


# -- command line --------------------------------------------------------------

_THRESHOLD_OPTIONS = {
    "explode_factor": "exploding when the final or peak global norm exceeds this x its early median",
    "vanish_ratio": "vanishing when a layer's final norm is below this x the largest layer's",
    "dead_zero_fraction": "dead when this share of a layer's gradient entries is exactly 0 over the tail",
    "clip_share": "persistent clipping when at least this share of tail steps is clipped",
    "edge_of_stability": "flag when lr*lambda_1/2 exceeds this at every tail Hessian probe",
    "tail_fraction": "the tail is this last share of logged steps",
    "baseline_fraction": "the early steps are this first share of logged steps",
}


def add_arguments(parser):
    """Adds `gradmon summary`'s arguments to an `argparse` parser."""
    parser.add_argument("logdir",
                        help="log_dir of a gradmon.GradientMonitor run (or its train/ subdirectory)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--png", metavar="FILE",
                        help="also draw the key curves into this PNG (needs matplotlib)")
    parser.add_argument("--grouping", choices=GROUPINGS, default="variable",
                        help="the grouping the run was monitored with; 'layer': each logged group is a row "
                             "(default: variable, rows are variable paths minus their last component)")
    defaults = Thresholds()
    group = parser.add_argument_group("thresholds")
    for name, text in _THRESHOLD_OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name),
                           help=f"{text} (default: {getattr(defaults, name):g})")
    return parser


def run_command(args):
    """Runs `gradmon summary` with parsed `args`; returns the exit status (0, or 2 on errors)."""
    try:
        thresholds = Thresholds(**{name: getattr(args, name) for name in _THRESHOLD_OPTIONS})
        run = load_run(args.logdir)
        if not is_gradmon_run(run):
            raise NoGradmonLogs(
                f"No gradmon statistics in the event files of {run_directory(args.logdir)!r}. "
                "Expected the `log_dir` of a gradmon.GradientMonitor run."
            )
        report = health_report(run, thresholds, grouping=args.grouping)
    except ValueError as error:  # NoGradmonLogs or a bad threshold
        print(f"gradmon summary: {error}", file=sys.stderr)
        return 2
    if args.png:
        try:
            plot(run, report, args.png)
        except ImportError as error:
            print(f"gradmon summary: {error}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(to_json(report), indent=2, allow_nan=False))
    else:
        print(format_table(report))
    return 0
