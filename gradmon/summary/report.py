"""Health report of a gradmon run: the numbers and flags behind `gradmon summary LOGDIR`.

Reading, judging and drawing are separate steps:

- `load_run(logdir)` reads the scalar series of a run's event files (its own
  TFRecord reader: checksums verified, damage reported, no TensorFlow import).
- `health_report(run)` turns them into a `HealthReport`: per-layer numbers,
  the curvature trend, flags (problems) and notes (worth knowing).
- `format_table`, `to_json` and `plot` display a report; `add_arguments` and
  `run_command` are the `gradmon summary` command line.

Importing this module does not import TensorFlow (`gradmon summary` starts in
well under a second); matplotlib is imported only to draw a PNG.

Rows are layers. A layer is a logged variable path minus its last component
(`model/dense/kernel` and `model/dense/bias` are the layer `model/dense`); its
gradient norm at a step is sqrt(sum of its variables' squared norms), i.e. the
norm of the layer's gradient as one vector. For a run monitored with
`grouping="layer"` (gradmon's default) the logged groups already are layers,
each its own row: the run records its grouping (`gradmon/config`), which the
report reads from any file of the run (`--grouping` overrides it). A run that
recorded none (runs written before it; a file started after its directory was
removed) has it inferred from its labels (`infer_grouping`), and says so.

Optimizers observed with `name=` write their tags under `name/`: each is its
own section (`observer_names`, `observer_run`, `health_reports`), the unnamed
one first. Steps of one optimizer's global norm written by several event files
(two processes writing one directory, a run restarted over its own steps) are
reported (`HealthReport.overlaps`); the later file's values are used.

Loss-scale overflows. Under mixed precision a `LossScaleOptimizer` skips the
steps whose *scaled* gradient overflowed and halves its scale: that is how
dynamic loss scaling finds its scale, not a gradient explosion. A logged step
with a NaN/inf raw gradient is an overflow when `gradients/overflow_steps`
rose at that step, or (runs written before that tag existed) when
`gradients/loss_scale` fell there from a value above 1. Overflow steps are left
out of every gradient series below; their number is reported as a note.

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
- grad/weight and update ratio: ||g|| / ||w|| and ||w_after - w_before|| /
  ||w_before|| of the whole layer at the last step. Weight norms are recovered
  as norm / grad_to_weight. A ratio whose weight norm is 0 (a zero-initialised
  bias) is undefined: a NaN ratio, or one logged as 0 while the gradient is
  not 0 (older gradmon). The layer's update ratio leaves such variables out;
  when every variable's ratio is undefined the layer's is "undefined" (`null`
  in JSON). Without grad_to_weight the update ratio is the plain mean of the
  variables' defined ratios. "-": not logged.
- zeros: mean share of exactly-zero gradient entries over the last
  `tail_fraction` of steps (variables weighted by size, recovered as
  (norm / rms)^2; equal weights when a size cannot be recovered).

Flags (thresholds are the fields of `Thresholds`; "early" steps are the first
`baseline_fraction` of logged steps with a finite norm, the "tail" the last
`tail_fraction`, each at least one step):

- exploding (global): the global raw gradient norm's final or peak value
  exceeds `explode_factor` (default 100) times its median over the early
  steps, or a logged step had a NaN/inf raw gradient entry that was not a
  loss-scale overflow, or the loss scale fell below 1 (even the unscaled
  gradient overflows).
- vanishing (per layer), judged on the evidence that says whether a layer
  learns. When update ratios are logged (defined for the layer and for at
  least one other): the layer's median update ratio over the tail is below
  `vanish_ratio` (default 1e-3) times the median of all layers' (under Adam
  and other adaptive optimizers a small gradient does not mean a small step:
  attention query/key kernels at initialisation have tiny gradients and
  ordinary updates). Otherwise: the layer's final raw norm is below
  `vanish_ratio` times the largest layer's final norm. The flag names the
  evidence used. Dead layers are reported as dead only.
- dead (per layer): the layer's zeros share over the tail is at least
  `dead_zero_fraction` (default 0.99), or its norm is exactly 0 at every tail
  step.
- nonfinite (per layer): in a run with non-finite updates
  (`gradients/nonfinite_steps` rose, or a logged step had a NaN/inf raw
  gradient that was not a loss-scale overflow), the layer's raw gradient norm
  is NaN/inf at every tail step, or its update ratio (else grad/weight) is
  undefined at every tail step (its weight norm is NaN/inf): a NaN reached its
  weights. Such a layer is reported as nonfinite only, not dead (its zero
  gradient is ReLU(NaN) = 0) and not vanishing. The exploding flag also counts
  the non-finite updates of unlogged steps from `gradients/nonfinite_steps`.
- clipping (global): clipping changed the gradient in at least `clip_share`
  (default 0.5) of the tail steps (global signal above); the detail names the
  layers clipped that often, most often first.
- edge_of_stability (global): the optimizer's own edge-of-stability ratio
  (`hessian/edge_of_stability`: its sharpness / its stability threshold, e.g.
  lambda_1(H) / (2/lr) for SGD, lambda_1(P^-1 H) / (38/lr) for Adam at
  beta_1 = 0.9; `gradmon.HessianMonitor` writes it where the threshold is known)
  exceeds `edge_of_stability` (default 1.1) at every Hessian probe in the last
  `tail_fraction` of probes: the update is unstable along the sharpest
  direction. Runs written before that tag had this meaning (no
  `hessian/gd_edge_of_stability`, `hessian/stability_threshold` or
  preconditioned eigenvalue beside it) logged lr * lambda_1 / 2, the edge of
  plain gradient descent, under the same tag: they are judged on it as before,
  and the report says so (`Curvature.edge_of_stability_meaning`).

Notes (not problems, but worth knowing):

- inactive (per layer): the zeros share over the tail is at least
  `inactive_zero_fraction` (default 0.5) but below the dead threshold: most
  units pass no gradient (e.g. ReLUs that are mostly off).
- loss_scale_overflow (global): steps the LossScaleOptimizer skipped.
- at_edge_of_stability (global): not past the edge, but the optimizer's
  edge-of-stability ratio reached `at_edge_of_stability` (default 0.9) at a
  Hessian probe of the tail: training sits at its edge of stability, where
  adaptive and plain gradient descent settle (Cohen et al. 2021, 2022); the
  sharpness is then set by the learning rate, and the loss may oscillate.
  Not for runs of the old meaning.
- spikes (global): gradient-norm spikes caught in the step (`on_spike`):
  their number (`gradients/spike/count`) and their steps with z-scores
  (`gradients/spike/at`), the largest first.

Optimizer state (shown, not judged): the median over the tail of
cos(update, -gradient) and cos(gradient, first moment) when the run logged
them (`stats=["cosines"]`).

Embedding tables (variables named `embeddings`) are sparse by design: the rows
of tokens absent from a batch get exact zeros. Their zeros share is shown but
not judged (their layers are dead only when the norm is 0).
"""

import dataclasses
import itertools
import json
import math
import os
import sys
import typing

import numpy as np

from gradmon import tags
# the reader lives in gradmon.events; its names stay importable from here
from gradmon.summary.events import (  # noqa: F401
    NoGradmonLogs, Overlap, ReadProblem, Run, is_gradmon_run, load_run, observer_names, run_directory)
from gradmon._validation import check_choice, check_positive_int, invalid


GROUPINGS = ("variable", "layer")
# "auto": the grouping the run recorded in `tags.CONFIG` (runs before it: "variable")
GROUPING_CHOICES = ("auto",) + GROUPINGS

EXPLODING = "exploding"
VANISHING = "vanishing"
DEAD = "dead"
NONFINITE = "nonfinite"
CLIPPING = "clipping"
EDGE_OF_STABILITY = "edge_of_stability"
INACTIVE = "inactive"
LOSS_SCALE_OVERFLOW = "loss_scale_overflow"
AT_EDGE_OF_STABILITY = "at_edge_of_stability"
SPIKES = "spikes"
# What `hessian/edge_of_stability` means in a run (`Curvature.edge_of_stability_meaning`).
OPTIMIZER_EDGE = "optimizer"  # sharpness / the optimizer's own stability threshold
GD_EDGE = "gradient_descent"  # runs before it: lr * lambda_1 / 2, plain gradient descent's

_EXPLANATIONS = {
    EXPLODING: "the gradient norm blew up or became NaN/inf: lower the learning rate, "
               "clip gradients, check the data and loss for inf/NaN.",
    VANISHING: "this layer barely learns compared with the others (saturation, bad init "
               "or scaling).",
    DEAD: "this layer's gradient is (almost) all exact zeros: dead ReLUs, a cut graph "
          "or a zeroed branch; it does not learn.",
    NONFINITE: "this layer's weights (or gradients) are NaN/inf since a non-finite update was "
               "applied (on_nonfinite='warn' applies them): nothing it computes since means "
               "anything, and a zero gradient here is ReLU(NaN) = 0, not dead units. Use "
               "on_nonfinite='skip' or 'stop', and find where the NaN came from (data, loss, "
               "learning rate, the transform).",
    CLIPPING: "clipping rewrites most steps: the effective step size is set by the "
              "clip threshold, not the learning rate; raise max_norm or lower the lr.",
    EDGE_OF_STABILITY: "the sharpness is past the stability threshold of the optimizer "
                       "(ratio > 1): its update is unstable along the sharpest direction; "
                       "expect oscillating or rising loss; lower the learning rate.",
    AT_EDGE_OF_STABILITY: "training sits at the optimizer's edge of stability: the sharpness "
                          "rose until the learning rate capped it (Cohen et al. 2021, 2022). "
                          "Common, not a failure; the loss may oscillate while it falls.",
    SPIKES: "the raw gradient norm jumped far above its running mean at these steps (z-score "
            "against the recent norms; the on_spike policy decided what to do with them). "
            "Look at the batches and the learning rate there.",
    INACTIVE: "most of this layer's gradient entries are exact zeros (e.g. ReLUs that are "
              "mostly off); it still learns through the rest. Watch it if the share grows.",
    LOSS_SCALE_OVERFLOW: "mixed precision: the LossScaleOptimizer skipped these steps because "
                         "the loss-scaled gradient overflowed float16, and lowered its scale. "
                         "Routine while the scale settles; not a gradient explosion.",
}

_CLIP_TOLERANCE = 1e-6  # relative: float32 rounding is not clipping
_PNG_NEEDS_MATPLOTLIB = "gradmon summary --png needs matplotlib: pip install matplotlib"
_EMBEDDING_WEIGHT = "embeddings"  # keras.layers.Embedding's table: sparse gradients by design

# Exit statuses of `gradmon summary`.
EXIT_OK = 0
EXIT_DAMAGED = 1  # the report was printed, but an event file is corrupted (or unreadable)
EXIT_ERROR = 2  # no report: bad arguments, no gradmon logs, PNG not writable


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Thresholds of `health_report`'s flags and notes (see the module docstring).

    Args:
        explode_factor: exploding when the global raw norm's final or peak
            value exceeds this times its early median. Defaults to `100.0`.
        vanish_ratio: vanishing when a layer's tail update ratio is below
            this times the layers' median (or, without update ratios, its
            final norm below this times the largest layer's). Defaults to
            `1e-3`.
        dead_zero_fraction: dead when a layer's mean zero-entry share over the
            tail is at least this. Defaults to `0.99`.
        inactive_zero_fraction: noted as mostly inactive when a layer's mean
            zero-entry share over the tail is at least this (and below
            `dead_zero_fraction`). Defaults to `0.5`.
        clip_share: persistent clipping when at least this share of tail
            steps was clipped. Defaults to `0.5`.
        edge_of_stability: past the edge when the optimizer's edge-of-stability
            ratio (sharpness / its stability threshold; lr * lambda_1 / 2 in
            older runs) exceeds this at every tail Hessian probe. Defaults to `1.1`.
        at_edge_of_stability: noted as at the edge when that ratio reaches
            this at a tail probe (and is not past the edge). Defaults to `0.9`.
        tail_fraction: the tail is this last share of logged steps (and of
            Hessian probes). Defaults to `0.2`.
        baseline_fraction: the early steps are this first share of logged
            steps. Defaults to `0.1`.
    """

    explode_factor: float = 100.0
    vanish_ratio: float = 1e-3
    dead_zero_fraction: float = 0.99
    inactive_zero_fraction: float = 0.5
    clip_share: float = 0.5
    edge_of_stability: float = 1.1
    at_edge_of_stability: float = 0.9
    tail_fraction: float = 0.2
    baseline_fraction: float = 0.1

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            share = field.name in _SHARES
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value) and value > 0 and (not share or value <= 1))
            if not ok:
                raise invalid(field.name, "a number in (0, 1]" if share else
                              "a positive finite number", value)


_SHARES = ("dead_zero_fraction", "inactive_zero_fraction", "clip_share", "tail_fraction",
           "baseline_fraction")


@dataclasses.dataclass
class LayerHealth:
    """One layer's row of the report (see the module docstring for each column).

    `final_grad_to_weight`, `final_update_ratio` and `tail_update_ratio` are
    `None` when not logged (`grad_to_weight_logged`, `update_ratio_logged`) or
    undefined (a zero weight norm). `zeros_judged` is False for embedding tables.
    """

    name: str
    variables: typing.List[str]
    final_norm: float
    peak_norm: float
    peak_step: typing.Optional[int]
    clipped_share: typing.Optional[float]
    nonfinite_steps: int
    final_grad_to_weight: typing.Optional[float]
    final_update_ratio: typing.Optional[float]
    tail_update_ratio: typing.Optional[float]
    grad_to_weight_logged: bool
    update_ratio_logged: bool
    tail_zero_fraction: typing.Optional[float]
    zeros_judged: bool


@dataclasses.dataclass
class GlobalHealth:
    """Whole-model numbers, from the global tags.

    `overflow_steps` counts the steps a LossScaleOptimizer skipped (the final
    `gradients/overflow_steps`, or the logged overflow steps of older runs);
    `excluded_steps` are the logged steps left out as overflows.
    `nonfinite_updates` counts the steps whose update was non-finite, logged or
    not (the last `gradients/nonfinite_steps`; `None` for runs before that tag),
    `nonfinite_updates_since` / `first_nonfinite_update_by` bound the first of
    them (after the former logged step, at or before the latter).
    """

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
    overflow_steps: int
    excluded_steps: typing.List[int]
    final_loss_scale: typing.Optional[float]
    nonfinite_updates: typing.Optional[int] = None
    nonfinite_updates_since: typing.Optional[int] = None
    first_nonfinite_update_by: typing.Optional[int] = None


@dataclasses.dataclass
class Trend:
    """First, last and largest value of a series, and where the largest is."""

    first: float
    last: float
    max: float
    max_step: typing.Optional[int]


@dataclasses.dataclass
class Curvature:
    """The Hessian probes' numbers, each a `Trend` (`None`: not logged).

    `edge_of_stability` is `hessian/edge_of_stability`: sharpness / the
    optimizer's own threshold (`edge_of_stability_meaning` `"optimizer"`), or in
    runs before that meaning lr * lambda_1 / 2 (`"gradient_descent"`).
    `gd_edge_of_stability` is lr * lambda_1 / 2 in newer runs,
    `preconditioned_eigenvalue` lambda_1(P^-1 H), `stability_threshold` the
    optimizer's threshold in sharpness units, `gradient_overlap` the share of
    |g|^2 in the top eigenspace. `layer_eigenvalues`: each layer's last top
    eigenvalue of its diagonal Hessian block, largest first.
    `edge_of_stability_on`: the sharpness the optimizer's ratio divides,
    `"lambda_1(P^-1 H)"` (adaptive optimizers) or `"lambda_1(H)"`; `None` for
    older runs or without a threshold.
    """

    probes: int
    first_step: int
    last_step: int
    eigenvalue: typing.Optional[Trend]
    edge_of_stability: typing.Optional[Trend]
    edge_of_stability_meaning: str = OPTIMIZER_EDGE
    gd_edge_of_stability: typing.Optional[Trend] = None
    preconditioned_eigenvalue: typing.Optional[Trend] = None
    stability_threshold: typing.Optional[Trend] = None
    gradient_overlap: typing.Optional[Trend] = None
    layer_eigenvalues: typing.Dict[str, float] = dataclasses.field(default_factory=dict)
    edge_of_stability_on: typing.Optional[str] = None


@dataclasses.dataclass
class Spikes:
    """Gradient-norm spikes of the run: `count` (the last `gradients/spike/count`, or the
    spikes written), and each written spike's `step` and `zscore`, largest z-score first."""

    count: int
    steps: typing.List[int]
    zscores: typing.List[float]


@dataclasses.dataclass
class OptimizerHealth:
    """Medians over the tail of the logged cosines (`None`: not logged or all undefined)."""

    cosine_update_gradient: typing.Optional[float]
    cosine_gradient_first_moment: typing.Optional[float]


@dataclasses.dataclass
class Flag:
    """A finding: `kind` (e.g. `"exploding"`), what it concerns, the evidence.

    `layers` lists every layer concerned when the finding is about several
    (the `detail` names the worst few).
    """

    kind: str
    subject: str
    detail: str
    layers: typing.List[str] = dataclasses.field(default_factory=list)

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
    notes: typing.List[Flag]
    clipping_source: str
    thresholds: Thresholds
    read_problems: typing.List[ReadProblem] = dataclasses.field(default_factory=list)
    spikes: typing.Optional[Spikes] = None
    optimizer: typing.Optional[OptimizerHealth] = None
    # the observer's `name=` (`None`: unnamed); the grouping the rows were built with and
    # where it came from: "recorded" (the run's `gradmon/config`), "inferred" (from the
    # tags: the run recorded none) or "given" (`grouping=`)
    name: typing.Optional[str] = None
    grouping: str = "variable"
    grouping_source: str = "given"
    overlaps: typing.List[Overlap] = dataclasses.field(default_factory=list)

    @property
    def damaged(self):
        """Whether an event file was corrupted (records lost) or an entry named like one
        could not be read, not merely cut short."""
        return any(p.kind in ("corrupt", "unreadable") for p in self.read_problems)


# -- judging -------------------------------------------------------------------

# Step counters and loss-scale bookkeeping: kept whole when overflow steps are left out.
_BOOKKEEPING = (tags.OVERFLOW_STEPS, tags.SKIPPED_STEPS, tags.LOSS_SCALE, tags.NO_GRADIENT,
                tags.SPIKE_COUNT, tags.SPIKE_AT)
# Written only by runs where `hessian/edge_of_stability` is the optimizer's own ratio.
_NEW_EDGE_TAGS = (tags.GD_EDGE_OF_STABILITY, tags.STABILITY_THRESHOLD, tags.preconditioned_eigenvalue(1))


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


def _weight_norms(norms, grad_to_weight):
    """||w|| = ||g|| / (||g|| / ||w||) per entry: 0 where the ratio says the weight is 0
    (NaN, inf, or 0 beside a nonzero gradient), NaN where it cannot be known."""
    weights = np.full(norms.shape, np.nan)
    live = np.isfinite(norms) & (norms > 0)
    ok = live & np.isfinite(grad_to_weight) & (grad_to_weight > 0)
    weights[ok] = norms[ok] / grad_to_weight[ok]
    zero = live & (~np.isfinite(grad_to_weight) | (grad_to_weight == 0))
    zero |= (norms == 0) & np.isnan(grad_to_weight)  # 0 / 0
    weights[zero] = 0.0
    return weights


def _layer_ratios(names, norms, grad_to_weight, update_ratios):
    """`(steps, grad/weight, update ratio)` of a layer per step (module docstring); NaN where
    undefined or unknown, `None` for a ratio not logged for every variable."""
    has_g2w = all(n in grad_to_weight for n in names)
    has_update = all(n in update_ratios for n in names)
    if not (has_g2w or has_update):
        return None, None, None
    k = len(names)
    steps, rows = _align([norms[n] for n in names]
                         + ([grad_to_weight[n] for n in names] if has_g2w else [])
                         + ([update_ratios[n] for n in names] if has_update else []))
    g = rows[:k]
    layer_g2w = layer_update = None
    with np.errstate(invalid="ignore", divide="ignore"):
        if has_g2w:
            w = _weight_norms(g, rows[k:2 * k])
            total = np.sqrt(np.sum(w**2, axis=0))  # NaN when a weight norm is unknown
            layer_g2w = np.where(total > 0, np.sqrt(np.sum(g**2, axis=0)) / total, np.nan)
        if has_update:
            u = rows[-k:]
            if has_g2w:  # ||delta w|| / ||w|| over the variables whose ratio is defined
                use = np.isfinite(u) & (w > 0)
                wu = np.where(use, w, 0.0)
                total = np.sqrt(np.sum(wu**2, axis=0))
                moved = np.sqrt(np.sum((np.where(use, u, 0.0) * wu) ** 2, axis=0))
                layer_update = np.where(total > 0, moved / total, np.nan)
            else:
                defined = np.isfinite(u)
                count = defined.sum(axis=0)
                layer_update = np.where(count > 0, np.where(defined, u, 0.0).sum(axis=0)
                                        / np.maximum(count, 1), np.nan)
    return steps, layer_g2w, layer_update


def _final(values):
    """Last entry as a float, `None` when it is undefined (NaN)."""
    if values is None or not len(values) or not np.isfinite(values[-1]):
        return None
    return float(values[-1])


def _layers(paths, grouping):
    out = {}
    for path in paths:
        layer = path.rsplit("/", 1)[0] if grouping == "variable" and "/" in path else path
        out.setdefault(layer, []).append(path)
    return out


def _is_embedding(path):
    return path.rsplit("/", 1)[-1] == _EMBEDDING_WEIGHT


def _finite_median(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else float("nan")


def _trend(series):
    steps, values = series
    peak, peak_step = _peak(steps, values)
    return Trend(float(values[0]), float(values[-1]), peak, peak_step)


def _nonfinite_steps(run):
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


def _nonfinite_updates(run):
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


def _poisoned(lsteps, lnorm, update, g2w, tail_steps):
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


def _overflow_steps(run, bad):
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


def _without_steps(run, steps):
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
# no grouping was grouped per variable when most of its group labels end in one of them.
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


_ONLY = object()  # health_report's default observer: the unnamed one, or the run's only one


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
        series = {t: v for t, v in run.items() if not (prefixes and t.startswith(prefixes))}
    else:
        prefix = f"{name}/"
        series = {t[len(prefix):]: v for t, v in run.items() if t.startswith(prefix)}
        if observer_names(run) == [name]:  # the model's curvature, beside its only optimizer
            series.update({t: v for t, v in run.items() if t.startswith("hessian/")})
    configs = dict(getattr(run, "configs", {}) or {})
    if None not in configs and getattr(run, "config", None):
        configs[None] = run.config
    return Run(series, problems=getattr(run, "problems", []), config=configs.get(name),
               overlaps=[o for o in getattr(run, "overlaps", []) if o.name == name])


def health_reports(run, thresholds=None, grouping="auto"):
    """One `HealthReport` per observer of the run (`health_report` of each `observer_names`
    entry: the unnamed one first, then the named ones by name).

    Raises:
        NoGradmonLogs: when `run` has no gradmon gradient statistics.
    """
    names = observer_names(run)
    if not names:
        health_report(run, thresholds, grouping)  # raises NoGradmonLogs
    return [health_report(run, thresholds, grouping, name=name) for name in names]


def health_report(run, thresholds=None, grouping="auto", name=_ONLY):
    """Judges the gradient health of one observer of a run.

    Args:
        run: `{tag: (steps, values)}` as returned by `load_run` (its
            `problems`, when it has them, become the report's
            `read_problems`; its `overlaps`, those of this observer's series).
        thresholds: a `Thresholds`, or `None` for the defaults.
            Defaults to `None`.
        grouping: the `grouping` the run was monitored with: `"variable"`
            (rows are layers, i.e. variable paths minus their last component),
            `"layer"` (each logged group is a row) or `"auto"` (what the
            observer recorded in `tags.CONFIG`, in any file of the run; when it
            recorded none, e.g. an older run or a file started after its
            directory was removed, `infer_grouping` of its labels). Defaults
            to `"auto"`.
        name: the observer's `name=` (`None`: the unnamed one). Defaults to
            the unnamed observer, or the only one when the run has a single
            (named) observer; `health_reports` makes one report per observer.

    Returns:
        A `HealthReport`.

    Raises:
        NoGradmonLogs: when `run` has no gradmon gradient statistics (of
            that observer).
        ValueError: when `name` is left out and the run holds several named
            observers and no unnamed one.
    """
    thresholds = Thresholds() if thresholds is None else thresholds
    check_choice("grouping", grouping, GROUPING_CHOICES)
    names = observer_names(run)
    if name is _ONLY:
        name = None if None in names or len(names) != 1 else names[0]
        if name is None and None not in names and names:
            raise invalid("name", f"the name of one of the run's observers {names} "
                          "(or gradmon.report.health_reports for all of them)", None)
    if not names or name not in names:
        raise NoGradmonLogs(
            f"No gradmon statistics in this run (no `{tags.prefixed(name, tags.global_norm(tags.RAW))}` "
            f"tag{'' if not names else f'; its observers: {names}'}). "
            "Expected the `log_dir` of a gradmon.GradientMonitor run."
        )
    run, observer = observer_run(run, name), name
    overlaps = list(run.overlaps)
    source = "given"
    if grouping == "auto":
        recorded = run.config.get("grouping")
        if recorded in GROUPINGS:
            grouping, source = recorded, "recorded"
        else:
            grouping, source = infer_grouping(_per_path(run, _stat_prefix(tags.RAW, "norm"))), "inferred"
    problems = list(getattr(run, "problems", []))
    all_steps = run[tags.global_norm(tags.RAW)][0]
    bad, suspect = _nonfinite_steps(run)
    overflows = _overflow_steps(run, suspect)
    if len(overflows) == len(all_steps):  # nothing would be left to judge
        overflows = set()
    run = _without_steps(run, overflows)
    steps, norm = run[tags.global_norm(tags.RAW)]
    n = len(steps)
    tail = _window(n, thresholds.tail_fraction)
    finite = norm[np.isfinite(norm)]
    peak, peak_step = _peak(steps, norm)

    nonfinite = np.isin(steps, np.array(sorted(bad - overflows), dtype=np.int64))
    clipped = _clipped_global(run, steps)
    transformed = run.get(tags.global_norm(tags.TRANSFORMED))
    overflow_count = len(overflows)
    if tags.OVERFLOW_STEPS in run:
        overflow_count = max(overflow_count, int(run[tags.OVERFLOW_STEPS][1][-1]))
    summary = GlobalHealth(
        first_step=int(all_steps[0]), last_step=int(all_steps[-1]), logged_steps=len(all_steps),
        final_norm=float(norm[-1]), peak_norm=peak, peak_step=peak_step,
        early_median_norm=_finite_median(finite[:_window(len(finite), thresholds.baseline_fraction)]),
        final_transformed_norm=None if transformed is None else float(transformed[1][-1]),
        clipped_share=None if clipped is None else float(np.mean(clipped)),
        tail_clipped_share=None if clipped is None else float(np.mean(clipped[-tail:])),
        nonfinite_steps=int(nonfinite.sum()),
        first_nonfinite_step=int(steps[nonfinite][0]) if nonfinite.any() else None,
        overflow_steps=overflow_count, excluded_steps=sorted(int(s) for s in overflows),
        final_loss_scale=(float(run[tags.LOSS_SCALE][1][-1]) if tags.LOSS_SCALE in run else None),
    )
    (summary.nonfinite_updates, summary.nonfinite_updates_since,
     summary.first_nonfinite_update_by) = _nonfinite_updates(run)
    # a layer may be poisoned by NaN only in a run that had a non-finite step (not an overflow)
    had_nonfinite = bool(summary.nonfinite_updates or summary.nonfinite_steps
                         or (suspect - overflows))

    raw_norms = _per_path(run, _stat_prefix(tags.RAW, "norm"))
    obs_norms = _per_path(run, _stat_prefix(tags.TRANSFORMED, "norm"))
    raw_nonfinite = _per_path(run, _stat_prefix(tags.RAW, "nonfinite"))
    zero_fractions = _per_path(run, _stat_prefix(tags.RAW, "zero_fraction"))
    raw_rms = _per_path(run, _stat_prefix(tags.RAW, "rms"))
    update_ratios = _per_path(run, tags.update_ratio(""))
    grad_to_weight = _per_path(run, tags.grad_to_weight(""))
    per_layer_clip = clipped is not None and bool(raw_norms) and all(p in obs_norms for p in raw_norms)
    clipping_source = "none" if clipped is None else ("layer" if per_layer_clip else "global")

    layers, layer_clipped_tail, dead_norm, poisoned = [], {}, {}, {}
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
            weights = np.ones(len(names)) if sizes is None or not sizes.sum() > 0 else sizes
            per_step = weights @ rows / weights.sum()
            zeros = float(np.mean(per_step[-_window(len(per_step), thresholds.tail_fraction):]))
        _, g2w, update = _layer_ratios(names, raw_norms, grad_to_weight, update_ratios)
        if had_nonfinite:
            poisoned[name] = _poisoned(lsteps, lnorm, update, g2w, ltail)
        tail_update = None
        if update is not None:
            recent = update[-_window(len(update), thresholds.tail_fraction):]
            tail_update = None if not np.isfinite(recent).any() else _finite_median(recent)
        layers.append(LayerHealth(
            name=name, variables=list(names), final_norm=float(lnorm[-1]), peak_norm=lpeak,
            peak_step=lpeak_step, clipped_share=share, nonfinite_steps=lnonfinite,
            final_grad_to_weight=_final(g2w), final_update_ratio=_final(update),
            tail_update_ratio=tail_update, grad_to_weight_logged=g2w is not None,
            update_ratio_logged=update is not None,
            tail_zero_fraction=zeros, zeros_judged=not any(_is_embedding(p) for p in names),
        ))

    curvature = _curvature(run)
    spikes = _spikes(run)
    optimizer = _optimizer_health(run, thresholds)

    flags, notes = _judge(summary, layers, thresholds, layer_clipped_tail, dead_norm, run, poisoned)
    flags, notes = _judge_curvature(curvature, run, thresholds, flags, notes)
    if spikes is not None and spikes.count:
        notes.append(Flag(SPIKES, "global", _spikes_detail(spikes, MAX_LISTED)))
    return HealthReport(summary=summary, layers=layers, curvature=curvature, flags=flags,
                        notes=notes, clipping_source=clipping_source, thresholds=thresholds,
                        read_problems=problems, spikes=spikes, optimizer=optimizer, name=observer,
                        grouping=grouping, grouping_source=source, overlaps=overlaps)


def _optional_trend(run, tag):
    return _trend(run[tag]) if tag in run and len(run[tag][0]) else None


def _curvature(run):
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


def _spikes(run):
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


def _spikes_detail(spikes, limit):
    listed = [f"{s} (z {_num(z)})" for s, z in zip(spikes.steps, spikes.zscores)]
    detail = f"{spikes.count} gradient-norm spike(s)"
    if listed:
        detail += f", largest first: step {_listed(listed, limit)}"
    if spikes.count > len(listed):
        detail += f"; {spikes.count - len(listed)} without their step in the event files"
    return detail


def _tail_median(run, tag, thresholds):
    if tag not in run:
        return None
    values = run[tag][1]
    value = _finite_median(values[-_window(len(values), thresholds.tail_fraction):])
    return value if math.isfinite(value) else None


def _optimizer_health(run, thresholds):
    if tags.COSINE_UPDATE_GRADIENT not in run and tags.COSINE_GRADIENT_FIRST_MOMENT not in run:
        return None
    return OptimizerHealth(
        cosine_update_gradient=_tail_median(run, tags.COSINE_UPDATE_GRADIENT, thresholds),
        cosine_gradient_first_moment=_tail_median(run, tags.COSINE_GRADIENT_FIRST_MOMENT, thresholds))


def _all_skipped_without_scale(run, summary):
    """Whether every non-finite step was skipped in a run that logged no loss scale."""
    if tags.SKIPPED_STEPS not in run or tags.LOSS_SCALE in run or tags.OVERFLOW_STEPS in run:
        return False
    counted, _ = _nonfinite_steps(run)
    s, count = run[tags.SKIPPED_STEPS]
    skipped = set(s[np.diff(count, prepend=0.0) > 0].tolist())
    return bool(counted) and counted <= skipped


def _why_not_updates(layer, by_update):
    if not layer.update_ratio_logged:
        return "no update ratios logged"
    if layer.tail_update_ratio is None:
        return "its update ratio is undefined"
    return "update ratios defined for fewer than 2 layers"


def _judge(summary, layers, thresholds, layer_clipped_tail, dead_norm, run, poisoned=None):
    """`(flags, notes)`; per-layer findings of one kind come worst first. A layer poisoned by
    NaN (`poisoned`: `{layer: why}`) is flagged as such only: not dead, not vanishing."""
    poisoned = {name: why for name, why in (poisoned or {}).items() if why}
    flags, notes = [], []
    limit = thresholds.explode_factor * summary.early_median_norm
    blown = [label for label, value in (("final", summary.final_norm), ("peak", summary.peak_norm))
             if math.isfinite(limit) and limit > 0 and value > limit]
    scale = summary.final_loss_scale
    parts = []
    if blown:
        parts.append(f"raw global norm {_num(summary.peak_norm)} peak (step "
                     f"{summary.peak_step}), {_num(summary.final_norm)} final: above "
                     f"{_num(thresholds.explode_factor)} x early median "
                     f"{_num(summary.early_median_norm)}")
    if summary.nonfinite_updates:
        since, by = summary.nonfinite_updates_since, summary.first_nonfinite_update_by
        when = f"at step {by}" if since + 1 == by else f"between steps {since + 1} and {by}"
        parts.append(f"{summary.nonfinite_updates} update(s) with NaN/inf values "
                     f"(`{tags.NONFINITE_STEPS}`, counted at every step), the first {when}")
    if summary.nonfinite_steps:
        parts.append(f"{summary.nonfinite_steps} step(s) with NaN/inf gradients, first at "
                     f"step {summary.first_nonfinite_step}")
        if _all_skipped_without_scale(run, summary):
            parts.append(f"all of them skipped (`{tags.SKIPPED_STEPS}`): if this run used mixed "
                         f"precision, it predates `{tags.LOSS_SCALE}` and these may be loss-scale "
                         "overflows, which this run cannot tell from explosions")
    if scale is not None and scale < 1:
        parts.append(f"loss scale fell to {_num(scale)} (< 1): the gradient overflows float16 "
                     "even unscaled")
    if parts:
        flags.append(Flag(EXPLODING, "global", "; ".join(parts)))

    if summary.overflow_steps:
        if tags.OVERFLOW_STEPS in run:
            s, count = run[tags.OVERFLOW_STEPS]
            rose = [str(step) for step in s[np.diff(count, prepend=0.0) > 0].tolist()]
            detail = (f"{summary.overflow_steps} step(s) skipped by the LossScaleOptimizer "
                      f"(`{tags.OVERFLOW_STEPS}` rose by step(s) {_listed(rose, 5)})")
        else:
            detail = (f"{summary.overflow_steps} step(s) with NaN/inf gradients while "
                      f"`{tags.LOSS_SCALE}` fell: skipped by the LossScaleOptimizer")
        if summary.excluded_steps:
            detail += (f"; logged step(s) {_listed([str(s) for s in summary.excluded_steps], 5)} "
                       "left out of the statistics")
        if tags.LOSS_SCALE in run:
            scales = run[tags.LOSS_SCALE][1]
            detail += f"; loss scale {scales[0]:g} -> {scales[-1]:g}"
        notes.append(Flag(LOSS_SCALE_OVERFLOW, "global", detail))

    tail_text = f"over the last {_pct(thresholds.tail_fraction)} of steps"
    flags += [Flag(NONFINITE, layer.name, f"{poisoned[layer.name]} {tail_text}")
              for layer in layers if layer.name in poisoned]
    dead, inactive = [], []
    for layer in layers:
        if layer.name in poisoned:
            continue
        zeros = layer.tail_zero_fraction if layer.zeros_judged else None
        if dead_norm[layer.name] or (zeros is not None and zeros >= thresholds.dead_zero_fraction):
            why = "norm exactly 0" if dead_norm[layer.name] else f"{zeros:.1%} of gradient entries exactly 0"
            dead.append((-(zeros or 1.0), Flag(DEAD, layer.name, f"{why} {tail_text}")))
        elif zeros is not None and zeros >= thresholds.inactive_zero_fraction:
            inactive.append((-zeros, Flag(INACTIVE, layer.name,
                                          f"mostly inactive: {zeros:.1%} of gradient entries "
                                          f"exactly 0 {tail_text} (dead at "
                                          f"{_pct(thresholds.dead_zero_fraction)})")))
    flags += [f for _, f in sorted(dead, key=lambda x: x[0])]
    notes += [f for _, f in sorted(inactive, key=lambda x: x[0])]
    dead_names = {f.subject for _, f in dead} | set(poisoned)

    alive = [l for l in layers if l.name not in dead_names]
    by_update = [l for l in alive if l.tail_update_ratio is not None]
    update_reference = _finite_median([l.tail_update_ratio for l in by_update])
    finals = [l.final_norm for l in layers if math.isfinite(l.final_norm)]
    norm_reference = max(finals, default=float("nan"))
    vanishing = []
    for layer in alive:
        if (layer.tail_update_ratio is not None and len(by_update) >= 2
                and math.isfinite(update_reference) and update_reference > 0):
            ratio = layer.tail_update_ratio / update_reference
            detail = (f"update ratio {_num(layer.tail_update_ratio)} (median of the tail) < "
                      f"{_num(thresholds.vanish_ratio)} x the layers' median "
                      f"{_num(update_reference)}; evidence: update ratios")
        elif math.isfinite(norm_reference) and norm_reference > 0:
            ratio = layer.final_norm / norm_reference
            detail = (f"final norm {_num(layer.final_norm)} < {_num(thresholds.vanish_ratio)} x "
                      f"largest layer's {_num(norm_reference)}; evidence: raw gradient norms "
                      f"({_why_not_updates(layer, by_update)})")
        else:
            continue
        if ratio < thresholds.vanish_ratio:  # the same judgement on either evidence
            vanishing.append((ratio, Flag(VANISHING, layer.name, detail)))
    flags += [f for _, f in sorted(vanishing, key=lambda x: x[0])]

    share = summary.tail_clipped_share
    if share is not None and share >= thresholds.clip_share:
        detail = (f"{share:.0%} of the last {_pct(thresholds.tail_fraction)} of steps clipped "
                  f"(threshold {_pct(thresholds.clip_share)})")
        often = sorted((name for name, s in layer_clipped_tail.items() if s >= thresholds.clip_share),
                       key=lambda name: -layer_clipped_tail[name])
        if layer_clipped_tail and not often:
            detail += "; no single layer clipped that often"
        flags.append(Flag(CLIPPING, "global", detail, layers=often))

    return flags, notes


def _judge_curvature(curvature, run, thresholds, flags, notes):
    """Past / at the edge of stability, judged on `hessian/edge_of_stability` (module docstring)."""
    if curvature is None or tags.EDGE_OF_STABILITY not in run:
        return flags, notes
    _, eos = run[tags.EDGE_OF_STABILITY]
    tail = eos[-_window(len(eos), thresholds.tail_fraction):]
    probes = f"at the last {len(tail)} Hessian probe(s)"
    if curvature.edge_of_stability_meaning == GD_EDGE:
        if np.all(tail > thresholds.edge_of_stability):
            flags.append(Flag(EDGE_OF_STABILITY, "global",
                              f"lr * lambda_1 / 2 between {_num(tail.min())} and "
                              f"{_num(tail.max())} {probes} "
                              f"(threshold {_num(thresholds.edge_of_stability)}); an older run: its "
                              f"`{tags.EDGE_OF_STABILITY}` is lr * lambda_1 / 2, the edge of plain "
                              "gradient descent, not the optimizer's own"))
        return flags, notes
    which = curvature.edge_of_stability_on or "sharpness"
    if np.all(tail > thresholds.edge_of_stability):
        flags.append(Flag(EDGE_OF_STABILITY, "global",
                          f"{which} / the optimizer's threshold between {_num(tail.min())} and "
                          f"{_num(tail.max())} {probes} (over the edge above "
                          f"{_num(thresholds.edge_of_stability)})"))
    elif np.nanmax(tail, initial=-np.inf) >= thresholds.at_edge_of_stability:
        notes.append(Flag(AT_EDGE_OF_STABILITY, "global",
                          f"{which} / the optimizer's threshold between {_num(np.nanmin(tail))} and "
                          f"{_num(np.nanmax(tail))} (median {_num(_finite_median(tail))}) {probes}: "
                          f"at the edge from {_num(thresholds.at_edge_of_stability)}"))
    return flags, notes


def _edge_sharpness(run):
    """`"lambda_1(P^-1 H)"` or `"lambda_1(H)"`: the sharpness whose ratio to the threshold
    `hessian/edge_of_stability` is (the nearer at the last probe holding all three), or `None`."""
    if tags.EDGE_OF_STABILITY not in run or tags.STABILITY_THRESHOLD not in run:
        return None
    candidates = [(name, tag) for name, tag in (("lambda_1(P^-1 H)", tags.preconditioned_eigenvalue(1)),
                                                ("lambda_1(H)", tags.eigenvalue(1))) if tag in run]
    series = [run[tags.EDGE_OF_STABILITY], run[tags.STABILITY_THRESHOLD]] + [run[t] for _, t in candidates]
    steps, rows = _align(series)
    if not candidates or not len(steps):
        return None
    edge, threshold = rows[0, -1], rows[1, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        misses = [abs(sharpness[-1] / threshold - edge) for sharpness in rows[2:]]
    return candidates[int(np.nanargmin(misses))][0] if np.isfinite(misses).any() else None


# -- displaying ----------------------------------------------------------------

MAX_LISTED = 5  # default number of layers named in one finding (the rest counted)


def _num(x):
    if x is None:
        return "-"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def _pct(x):
    return "-" if x is None else f"{x:.0%}"


def _ratio(value, logged):
    if not logged:
        return "-"
    return "undefined" if value is None else _num(value)


def _listed(names, limit):
    """The first `limit` names, then a count of the rest ("... and 94 more")."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} ... and {len(names) - limit} more"


def _rows_text(header, rows):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(row):  # first column left-aligned, numbers right-aligned
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return [line(header)] + [line(r) for r in rows]


def _findings_text(title, findings, max_listed):
    """One section of findings; past `max_listed` per-layer findings of a kind, a count."""
    if not findings:
        return [f"{title}: none"]
    out = [f"{title}:"]
    for kind, group in itertools.groupby(findings, key=lambda f: f.kind):
        group = list(group)
        for f in group[:max_listed]:
            label = "layers clipped that often" if kind == CLIPPING else "layers"
            detail = f.detail + (f"; {label}: {_listed(f.layers, max_listed)}" if f.layers else "")
            out.append(f"  {f.kind.upper()} [{f.subject}] {detail}")
            out.append(f"    {f.explanation}")
        if len(group) > max_listed:
            out.append(f"  ... and {len(group) - max_listed} more {kind.upper()} layers "
                       "(all of them in --json)")
    return out


def _curvature_text(c, max_listed):
    out = ["", f"curvature: {c.probes} Hessian probe(s), steps {c.first_step}-{c.last_step}"]
    old = c.edge_of_stability_meaning == GD_EDGE
    named = [("lambda_1", c.eigenvalue), ("lambda_1(P^-1 H)", c.preconditioned_eigenvalue),
             ("stability threshold", c.stability_threshold),
             ("lr*lambda_1/2" if old else "edge of stability", c.edge_of_stability),
             ("lr*lambda_1/2", c.gd_edge_of_stability), ("gradient overlap", c.gradient_overlap)]
    rows = [[name, _num(t.first), _num(t.last), _num(t.max)] for name, t in named if t is not None]
    out += _rows_text(["", "first", "last", "max"], rows)
    if old and c.edge_of_stability is not None:
        out.append(f"edge of stability: an older run, its `{tags.EDGE_OF_STABILITY}` is "
                   "lr * lambda_1 / 2 (plain gradient descent's edge), judged as such")
    elif c.edge_of_stability is not None:
        out.append(f"edge of stability: {c.edge_of_stability_on or 'sharpness'} / the optimizer's own "
                   "threshold (1 = at the edge)")
    elif not old:
        out.append("edge of stability: no threshold known for this optimizer (none written)")
    if c.layer_eigenvalues:
        listed = [f"{name} {_num(value)}" for name, value in c.layer_eigenvalues.items()]
        out.append(f"per-layer top eigenvalue (last probe, largest first): {_listed(listed, max_listed)}")
    return out


def format_tables(reports, max_listed=MAX_LISTED):
    """Several observers' reports (`health_reports`) as plain text: the damage found in the
    run once, then each report (`format_table`), separated by a blank line."""
    reports = list(reports)
    if len(reports) == 1:
        return format_table(reports[0], max_listed=max_listed)
    head = [f"WARNING: {p.message}" for p in (reports[0].read_problems if reports else [])]
    body = "\n\n".join(format_table(r, max_listed=max_listed, read_problems=False) for r in reports)
    return "\n".join(head + [body])


def format_table(report, max_listed=MAX_LISTED, read_problems=True):
    """The report as plain text: damage warnings, layer rows, curvature, flags, notes.

    Args:
        report: a `HealthReport`.
        max_listed: at most this many layers are named per kind of finding;
            the rest are counted. Defaults to `5`.
        read_problems: whether to begin with the damage found in the event
            files (`format_tables` says it once for several reports).
            Defaults to `True`.
    """
    max_listed = check_positive_int("max_listed", max_listed)
    s = report.summary
    out = [f"WARNING: {p.message}" for p in report.read_problems] if read_problems else []
    out += [f"WARNING: {o.message}" for o in report.overlaps]
    who = "" if report.name is None else f" of optimizer `{report.name}`"
    out += [f"gradmon health report{who}: steps {s.first_step}-{s.last_step} "
            f"({s.logged_steps} logged)", ""]
    header = ["layer", "final norm", "peak norm", "peak step", "clipped", "non-finite",
              "grad/weight", "update ratio", "zeros"]
    rows = [[l.name, _num(l.final_norm), _num(l.peak_norm), _num(l.peak_step),
             _pct(l.clipped_share), str(l.nonfinite_steps),
             _ratio(l.final_grad_to_weight, l.grad_to_weight_logged),
             _ratio(l.final_update_ratio, l.update_ratio_logged),
             _pct(l.tail_zero_fraction)] for l in report.layers]
    rows.append(["(global)", _num(s.final_norm), _num(s.peak_norm), _num(s.peak_step),
                 _pct(s.clipped_share), str(s.nonfinite_steps), "", "", ""])
    out += _rows_text(header, rows)
    source = {"layer": "per layer, transformed vs raw norms",
              "global": "global clip ratio / fraction",
              "none": "no transform logged"}[report.clipping_source]
    out += ["", f"norms: raw gradient L2; early median {_num(s.early_median_norm)} (finite "
                f"values); clipped: {source}; zeros: mean over the last "
                f"{_pct(report.thresholds.tail_fraction)} of steps"]
    if s.excluded_steps:
        out.append(f"left out: {len(s.excluded_steps)} loss-scale overflow step(s)")
    if report.grouping_source == "inferred":
        out.append(f"rows: the run recorded no grouping (`{tags.CONFIG}`: an older run, or a file "
                   f"started after its directory was removed); inferred from its tags: "
                   f"grouping=\"{report.grouping}\" (--grouping overrides)")
    if report.curvature is not None:
        out += _curvature_text(report.curvature, max_listed)
    o = report.optimizer
    if o is not None:
        out += ["", f"optimizer state (medians over the last {_pct(report.thresholds.tail_fraction)} "
                    f"of steps): cos(update, -gradient) {_num(o.cosine_update_gradient)}, "
                    f"cos(gradient, first moment) {_num(o.cosine_gradient_first_moment)}"]
    out += [""] + _findings_text("flags", report.flags, max_listed)
    if report.notes:
        notes = [dataclasses.replace(f, detail=_spikes_detail(report.spikes, max_listed))
                 if f.kind == SPIKES and report.spikes is not None else f for f in report.notes]
        out += _findings_text("notes", notes, max_listed)
    return "\n".join(out)


def _md(text):
    """Text safe inside Markdown (table cells, emphasis): no pipes, no stray markup."""
    return str(text).replace("|", "/").replace("*", "\\*").replace("_", "\\_")


def _skipped_steps(run):
    """The logged steps at which `gradients/skipped_steps` rose (updates not applied), or `None`."""
    if run is None or tags.SKIPPED_STEPS not in run:
        return None
    steps, values = run[tags.SKIPPED_STEPS]
    before = np.concatenate([[0.0], values[:-1]])
    return [int(s) for s, v, b in zip(steps, values, before) if v > b]


def format_markdown(report, max_listed=MAX_LISTED, run=None):
    """The report as Markdown, for TensorBoard's Text tab (`gradmon.writer.write_report`).

    The same `HealthReport` as `format_table`: a headline, the flags and notes
    with their explanations, the worst layers (flagged first, then the largest
    and smallest final norms) as a table, the steps of spikes, non-finite
    gradients and skipped updates, and the full text report in a code block.

    Args:
        report: a `HealthReport`.
        max_listed: at most this many layers named per kind of finding and per
            ranking. Defaults to `5`.
        run: the run judged (`{tag: (steps, values)}`), to list the logged
            steps whose update was not applied. Defaults to `None`.
    """
    max_listed = check_positive_int("max_listed", max_listed)
    s = report.summary
    who = "" if getattr(report, "name", None) is None else f" of optimizer `{report.name}`"
    counts = []
    for title, findings in (("flag", report.flags), ("note", report.notes)):
        kinds = [k.upper() for k, _ in itertools.groupby(findings, key=lambda f: f.kind)]
        n = len(findings)
        counts.append(f"**{n} {title}{'s' if n != 1 else ''}**" + (f": {', '.join(kinds)}" if kinds else ""))
    out = [f"### gradmon health report{who}: steps {s.first_step}-{s.last_step} ({s.logged_steps} logged)",
           "", " &middot; ".join(counts), ""]
    out += [f"WARNING: {_md(p.message)}  " for p in report.read_problems]
    for title, findings in (("Flags", report.flags), ("Notes", report.notes)):
        if not findings:
            continue
        out += [f"#### {title}", ""]
        for kind, group in itertools.groupby(findings, key=lambda f: f.kind):
            group = list(group)
            for f in group[:max_listed]:
                detail = f.detail
                if f.kind == SPIKES and report.spikes is not None:
                    detail = _spikes_detail(report.spikes, max_listed)
                if f.layers:
                    detail += f"; layers: {_listed(f.layers, max_listed)}"
                out.append(f"- **{f.kind.upper()}** [{_md(f.subject)}] {_md(detail)}<br>"
                           f"*{_md(f.explanation)}*")
            if len(group) > max_listed:
                out.append(f"- ... and {len(group) - max_listed} more {kind.upper()} layers")
        out.append("")
    flagged = {}
    for f in list(report.flags) + list(report.notes):
        for name in [f.subject] + list(f.layers):
            flagged.setdefault(name, [])
            if f.kind.upper() not in flagged[name]:
                flagged[name].append(f.kind.upper())
    finite = sorted((l for l in report.layers if math.isfinite(l.final_norm)), key=lambda l: l.final_norm)
    worst = [l for l in report.layers if l.name in flagged][:max_listed]
    each = min(max_listed, max(1, len(finite) // 4))  # a few of each end, not every layer twice
    for layer, why in ([(l, "largest norm") for l in finite[::-1][:each]]
                       + [(l, "smallest norm") for l in finite[:each]]):
        if layer not in worst and len(worst) < 2 * max_listed and len(report.layers) > len(worst):
            worst.append(layer)
            flagged.setdefault(layer.name, []).append(why)
    if worst:
        out += [f"#### Worst layers ({len(worst)} of {len(report.layers)})", "",
                "| layer | why | final norm | peak norm | peak step | update ratio | zeros |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for l in worst:
            out.append(f"| {_md(l.name)} | {', '.join(flagged.get(l.name, []))} | {_num(l.final_norm)} | "
                       f"{_num(l.peak_norm)} | {_num(l.peak_step)} | "
                       f"{_ratio(l.final_update_ratio, l.update_ratio_logged)} | {_pct(l.tail_zero_fraction)} |")
        out.append("")
    events = []
    if report.spikes is not None:
        events.append(f"- spikes: {_md(_spikes_detail(report.spikes, max_listed))}")
    if s.nonfinite_steps:
        events.append(f"- logged steps with a NaN/inf raw gradient: {s.nonfinite_steps}, the first at step "
                      f"{_num(s.first_nonfinite_step)}")
    updates = getattr(s, "nonfinite_updates", None)
    if updates:
        events.append(f"- updates with a non-finite gradient (every step counted): {updates}")
    skipped = _skipped_steps(run)
    if skipped:
        events.append(f"- updates not applied ({tags.SKIPPED_STEPS}), at logged steps: "
                      f"{_md(_listed([str(x) for x in skipped], max_listed))}")
    if s.excluded_steps:
        events.append(f"- loss-scale overflow steps (left out): "
                      f"{_listed([str(x) for x in s.excluded_steps], max_listed)}")
    out += ["#### Spikes and skipped updates", ""] + (events or ["- none"]) + [""]
    out += ["#### The full report (`gradmon summary`)", "", "```",
            format_table(report, max_listed=max_listed), "```"]
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
    """The report as plain dicts and lists.

    Non-finite numbers become "nan"/"inf"/"-inf"; undefined or unlogged ratios
    are `null`. Flags and notes carry their `explanation`, read problems their
    `message`.
    """
    out = dataclasses.asdict(report)
    for key in ("flags", "notes"):
        out[key] = [dict(dataclasses.asdict(f), explanation=f.explanation)
                    for f in getattr(report, key)]
    out["read_problems"] = [dict(dataclasses.asdict(p), message=p.message)
                            for p in report.read_problems]
    out["overlaps"] = [dict(dataclasses.asdict(o), message=o.message) for o in report.overlaps]
    return _jsonable(out)


def reports_to_json(reports):
    """Several observers' reports (`health_reports`): a run with only the unnamed observer
    gives its `to_json` as it is; otherwise `{"sections": [to_json of each]}`, each with
    its `name`."""
    reports = list(reports)
    if len(reports) == 1 and reports[0].name is None:
        return to_json(reports[0])
    return {"sections": [to_json(r) for r in reports]}


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


# -- command line --------------------------------------------------------------

_THRESHOLD_OPTIONS = {
    "explode_factor": "exploding when the final or peak global norm exceeds this x its early median",
    "vanish_ratio": "vanishing when a layer's tail update ratio is below this x the layers' median "
                    "(without update ratios: its final norm below this x the largest layer's)",
    "dead_zero_fraction": "dead when this share of a layer's gradient entries is exactly 0 over the tail",
    "inactive_zero_fraction": "note a layer as mostly inactive from this share of exact zeros",
    "clip_share": "persistent clipping when at least this share of tail steps is clipped",
    "edge_of_stability": "flag when sharpness / the optimizer's stability threshold (lr*lambda_1/2 in "
                         "older runs) exceeds this at every tail Hessian probe",
    "at_edge_of_stability": "note training as at the edge of stability when that ratio reaches this "
                            "at a tail Hessian probe",
    "tail_fraction": "the tail is this last share of logged steps",
    "baseline_fraction": "the early steps are this first share of logged steps",
}


def add_arguments(parser):
    """Adds `gradmon summary`'s arguments to an `argparse` parser."""
    parser.add_argument("logdir",
                        help="log_dir of a gradmon.GradientMonitor run (or its train/ subdirectory)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--png", metavar="FILE",
                        help="also draw the key curves into this PNG, creating its directory "
                             "(needs matplotlib)")
    parser.add_argument("--grouping", choices=GROUPING_CHOICES, default="auto",
                        help="the grouping the run was monitored with; 'layer': each logged group is a row, "
                             "'variable': rows are variable paths minus their last component (default: auto, "
                             "what the run recorded; variable for runs that recorded none)")
    parser.add_argument("--max-listed", type=int, default=MAX_LISTED,
                        help=f"name at most this many layers per kind of finding, count the rest "
                             f"(default: {MAX_LISTED})")
    defaults = Thresholds()
    group = parser.add_argument_group("thresholds")
    for name, text in _THRESHOLD_OPTIONS.items():
        group.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name),
                           help=f"{text} (default: {getattr(defaults, name):g})")
    parser.epilog = (f"exit status: {EXIT_OK} report printed; {EXIT_DAMAGED} report printed, but an "
                     "event file is corrupted (records lost; each file named on stderr with its "
                     "last good step) or an entry named like one is no readable file (a directory, "
                     f"a broken link); {EXIT_ERROR} bad arguments or no gradmon logs (no report), "
                     "or the PNG could not be written")
    return parser


def run_command(args):
    """Runs `gradmon summary` with parsed `args`.

    Returns:
        The exit status: 0; 1 when the report was printed but an event file is
        corrupted (each damaged file is named on stderr with its last good
        step) or an entry named like one could not be read; 2 on errors (bad
        arguments, no gradmon logs, an unwritable PNG). Several optimizers
        (`name=`) give one report each (`health_reports`); steps written by
        several files are warned of on stderr (`HealthReport.overlaps`).
    """
    try:
        thresholds = Thresholds(**{name: getattr(args, name) for name in _THRESHOLD_OPTIONS})
        max_listed = check_positive_int("max_listed", args.max_listed)
        run = load_run(args.logdir)
        if not is_gradmon_run(run):
            raise NoGradmonLogs(
                f"No gradmon statistics in the event files of {run_directory(args.logdir)!r}. "
                "Expected the `log_dir` of a gradmon.GradientMonitor run."
            )
        reports = health_reports(run, thresholds, grouping=args.grouping)
    except ValueError as error:  # NoGradmonLogs or a bad threshold
        print(f"gradmon summary: {error}", file=sys.stderr)
        return EXIT_ERROR
    for problem in reports[0].read_problems:
        print(f"gradmon summary: warning: {problem.message}", file=sys.stderr)
    for report in reports:
        for overlap in report.overlaps:
            print(f"gradmon summary: warning: {overlap.message}", file=sys.stderr)
    if args.json:
        print(json.dumps(reports_to_json(reports), indent=2, allow_nan=False))
    else:
        print(format_tables(reports, max_listed=max_listed))
    if args.png:
        try:
            for report in reports:
                path = args.png
                if len(reports) > 1:  # one picture per observer: FILE-<name>.png
                    stem, ext = os.path.splitext(args.png)
                    path = f"{stem}-{tags.sanitize(report.name or 'unnamed')}{ext or '.png'}"
                    print(f"gradmon summary: {report.name or 'unnamed'}: {path}", file=sys.stderr)
                plot(observer_run(run, report.name), report, path)
        except (ImportError, ValueError) as error:
            print(f"gradmon summary: {error}", file=sys.stderr)
            return EXIT_ERROR
    return EXIT_DAMAGED if reports[0].damaged else EXIT_OK
