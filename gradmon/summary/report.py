"""Health report of a gradmon run: the numbers and flags behind `gradmon summary LOGDIR`.

Reading, judging and drawing are separate steps, each in the module named after it
(this module re-exports their public names, and holds the rules below):

- `gradmon.summary.events`: `load_run(logdir)` reads the scalar series of a
  run's event files (its own TFRecord reader: checksums verified, damage
  reported, no TensorFlow import).
- `gradmon.summary.health`: what a report holds (`Thresholds`, `HealthReport`,
  its rows and sections, `Flag` and the kinds of finding).
- `gradmon.summary.series` (arithmetic on `(steps, values)` series) and
  `gradmon.summary.analysis`: the numbers of one observer's run, per layer
  and global, the curvature trend, the spikes.
- `gradmon.summary.judgement`: `health_report(run)` turns them into a
  `HealthReport`, with flags (problems) and notes (worth knowing).
- `gradmon.summary.render` (`format_table`, `format_markdown`, `to_json`) and
  `gradmon.summary.plot` (`plot`) display a report; `gradmon.summary.cli`
  (`add_arguments`, `run_command`) is the `gradmon summary` command line.

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
  global `gradients/raw/nonfinite` count). The (global) row counts every step
  when the run wrote `gradients/nonfinite_steps` (updates with NaN/inf values,
  logged or not, loss-scale overflows left out; the logged count when that is
  larger), as the exploding flag does; a layer's count stays that of its
  logged steps (which layer was non-finite at an unlogged step is not
  recorded), so a layer poisoned by NaN between logged steps can read 0.
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

# The public names of the modules above, importable from here as before the split.
from gradmon.summary.events import (
    NoGradmonLogs, Overlap, ReadProblem, Run, is_gradmon_run, load_run, observer_names, run_directory)
from gradmon.summary.health import (
    AT_EDGE_OF_STABILITY, CLIPPING, DEAD, EDGE_OF_STABILITY, EXPLODING, GD_EDGE, GROUPING_CHOICES,
    GROUPINGS, INACTIVE, LOSS_SCALE_OVERFLOW, NONFINITE, OPTIMIZER_EDGE, SPIKES, VANISHING, Curvature,
    Flag, GlobalHealth, HealthReport, LayerHealth, OptimizerHealth, Spikes, Thresholds, Trend)
from gradmon.summary.analysis import infer_grouping, observer_run
from gradmon.summary.judgement import health_report, health_reports
from gradmon.summary.wording import MAX_LISTED
from gradmon.summary.render import (
    format_markdown, format_table, format_tables, reports_to_json, to_json)
from gradmon.summary.plot import plot
from gradmon.summary.cli import EXIT_DAMAGED, EXIT_ERROR, EXIT_OK, add_arguments, run_command

__all__ = [
    "add_arguments",
    "AT_EDGE_OF_STABILITY",
    "CLIPPING",
    "Curvature",
    "DEAD",
    "EDGE_OF_STABILITY",
    "EXIT_DAMAGED",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXPLODING",
    "Flag",
    "format_markdown",
    "format_table",
    "format_tables",
    "GD_EDGE",
    "GlobalHealth",
    "GROUPING_CHOICES",
    "GROUPINGS",
    "health_report",
    "health_reports",
    "HealthReport",
    "INACTIVE",
    "infer_grouping",
    "is_gradmon_run",
    "LayerHealth",
    "load_run",
    "LOSS_SCALE_OVERFLOW",
    "MAX_LISTED",
    "NoGradmonLogs",
    "NONFINITE",
    "observer_names",
    "observer_run",
    "OPTIMIZER_EDGE",
    "OptimizerHealth",
    "Overlap",
    "plot",
    "ReadProblem",
    "reports_to_json",
    "Run",
    "run_command",
    "run_directory",
    "SPIKES",
    "Spikes",
    "Thresholds",
    "to_json",
    "Trend",
    "VANISHING",
]
