"""What a health report holds: its thresholds, its numbers, its findings.

`Thresholds` (the flags' thresholds), the rows and sections of a report
(`LayerHealth`, `GlobalHealth`, `Curvature`, `Spikes`, `OptimizerHealth`),
a finding (`Flag`, with the kinds below and their explanations) and the
`HealthReport` that holds them all. Plain data: `analysis` measures the run,
`judgement` fills a report in, `render` and `plot` display it; the rules are
in `gradmon.summary.report`'s docstring.
"""

import dataclasses
import math
import typing

from gradmon.summary.events import Overlap, ReadProblem
from gradmon._validation import invalid


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
              "clip threshold, not the learning rate; raise the threshold (max_norm, "
              "adaptive_clip's clip_factor, zclip's z_threshold) or lower the lr.",
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

