"""Every TensorBoard tag gradmon writes, and its one-line description.

Tags are part of gradmon's public interface (custom-scalar layouts and users'
regexes select them), so they are built here and nowhere else.
"""

import functools
import re

RAW = "raw"
TRANSFORMED = "transformed"
KINDS = (RAW, TRANSFORMED)

# Per-group statistics, in the order the monitored train step stores them.
GROUP_STATS = ("norm", "max_abs", "rms", "zero_fraction", "nonfinite")

_GROUP_STAT_DESCRIPTIONS = {
    "norm": "L2 norm of the {kind} gradient of `{path}`.",
    "max_abs": "Largest absolute entry of the {kind} gradient of `{path}`.",
    "rms": "Root mean square of the {kind} gradient of `{path}` (norm / sqrt(size)).",
    "zero_fraction": "Share of entries of the {kind} gradient of `{path}` that are exactly 0.",
    "nonfinite": "Number of NaN or infinite entries in the {kind} gradient of `{path}`.",
}

_INVALID_TAG_CHARS = re.compile(r"[^A-Za-z0-9_.\-/]")


@functools.lru_cache(maxsize=4096)
def sanitize(path):
    """Makes a variable path safe for tags and custom-scalar regexes."""
    return _INVALID_TAG_CHARS.sub("_", path)


def prefixed(prefix, tag):
    """`tag` under an observer's name (`critic/gradients/...`), or `tag` itself."""
    return tag if not prefix else f"{sanitize(prefix)}/{tag}"


def group_label(path, prefix=None):
    """The label of a group (a variable or layer path) in the tags of an observer named
    `prefix`: the path without a leading `prefix/`, so that an observer named like its
    model writes `critic/gradients/raw/norm/c1`, not `critic/gradients/raw/norm/critic/c1`.
    (Runs written before this kept the repeated name; `gradmon summary` reads both.)"""
    if prefix and path.startswith(f"{prefix}/") and len(path) > len(prefix) + 1:
        return path[len(prefix) + 1:]
    return path


def ordinal(i):
    """`1st`, `2nd`, `3rd`, `4th`, ..., `11th`, `12th`, `13th`, ..., `21st`."""
    i = int(i)
    suffix = "th" if 10 <= i % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(i % 10, "th")
    return f"{i}{suffix}"


def _index_ordinal(tag):
    """The ordinal of a tag ending in `_<i>` (`hessian/eigenvalue_2` -> `2nd`)."""
    index = tag.rsplit("_", 1)[1]
    return ordinal(index) if index.isdigit() else f"{index}-th"


def global_norm(kind):
    return f"gradients/{kind}/global_norm"


def nonfinite_total(kind):
    return f"gradients/{kind}/nonfinite"


def group_stat(kind, stat, path):
    return f"gradients/{kind}/{stat}/{sanitize(path)}"


def histogram(kind, path):
    return f"gradients/{kind}/hist/{sanitize(path)}"


def grad_to_weight(path):
    return f"gradients/grad_to_weight/{sanitize(path)}"


def update_ratio(path):
    return f"gradients/update_ratio/{sanitize(path)}"


# Optimizer state: norms of the optimizer's moment slots, cosines of update, gradient and
# first moment (`stats=["moment_norm", "cosines"]`).
FIRST_MOMENT = "first_moment"
SECOND_MOMENT = "second_moment"
MOMENTS = (FIRST_MOMENT, SECOND_MOMENT)
OPTIMIZER_PREFIX = "optimizer/"
COSINE_UPDATE_GRADIENT = "optimizer/cosine/update_gradient"
COSINE_GRADIENT_FIRST_MOMENT = "optimizer/cosine/gradient_first_moment"


def moment_norm(moment, path):
    """Norm of the optimizer's `first_moment` / `second_moment` slots of a group."""
    return f"optimizer/{moment}/norm/{sanitize(path)}"


CLIP_RATIO = "gradients/clip/ratio"
CLIP_FRACTION = "gradients/clip/fraction"
NO_GRADIENT = "gradients/no_gradient"
SKIPPED_STEPS = "gradients/skipped_steps"
# Steps so far whose update (what the optimizer gets, after the transform) was non-finite,
# counted on the device at every step, logged or not (loss-scale overflows left out).
NONFINITE_STEPS = "gradients/nonfinite_steps"
# Mixed precision: the LossScaleOptimizer's scale, and steps it skipped because
# the *scaled* gradient overflowed (its routine business, not an explosion).
LOSS_SCALE = "gradients/loss_scale"
OVERFLOW_STEPS = "gradients/overflow_steps"


def clip_fraction_of(member):
    """Clip fraction of one member of a chain of transforms."""
    return f"{CLIP_FRACTION}/{sanitize(member)}"


NOISE_SCALE = "gradients/noise_scale"
NOISE_SCALE_EMA = "gradients/noise_scale_ema"
NOISE_GRAD_SQ = "gradients/noise_scale/grad_sq"
NOISE_TRACE_COV = "gradients/noise_scale/trace_cov"


def snr(path):
    return f"gradients/snr/{sanitize(path)}"


# Spikes caught in the step (`on_spike`, gradmon.spikes) and ZClip (gradmon.transforms.zclip).
SPIKE_ZSCORE = "gradients/spike/zscore"
SPIKE_LOSS_ZSCORE = "gradients/spike/loss_zscore"
SPIKE_COUNT = "gradients/spike/count"
SPIKE_AT = "gradients/spike/at"


def zclip_threshold(member="zclip"):
    """The clipping threshold of a `zclip` transform member (`gradients/zclip/threshold`)."""
    return f"gradients/{sanitize(member)}/threshold"


# A text summary (JSON) of the monitoring configuration, read back by `gradmon summary`.
CONFIG = "gradmon/config"


def config(prefix=None):
    return prefixed(prefix, CONFIG)


# The `gradmon summary` report of the run so far, as Markdown (TensorBoard's Text tab).
REPORT = "gradmon/report"


def report(prefix=None):
    return prefixed(prefix, REPORT)


def group_run(group):
    """The TensorBoard run (a subdirectory of the run directory, e.g. `train/<group>`) that holds
    a group's per-group series: TensorBoard colours lines by run, so each layer gets its colour."""
    parts = [p if p not in ("", ".", "..") else "_" for p in sanitize(group).split("/")]
    return "/".join(parts)


LOSS_DATA = "loss/data"
LOSS_TOTAL = "loss/total"


def penalty(name):
    return f"penalties/{sanitize(name)}"


def penalty_share(name):
    return f"{penalty(name)}/share"


def penalty_grad_norm(name):
    return f"{penalty(name)}/grad_norm"


HESSIAN_TRACE = "hessian/trace"
HESSIAN_TRACE_STDERR = "hessian/trace_stderr"
HESSIAN_HVP_COUNT = "hessian/hvp_count"
EDGE_OF_STABILITY = "hessian/edge_of_stability"
HESSIAN_MIN_EIGENVALUE = "hessian/min_eigenvalue"
HESSIAN_DENSITY = "hessian/density"


EIGENVALUE_PREFIX = "hessian/eigenvalue_"
RESIDUAL_PREFIX = "hessian/residual_"


def eigenvalue(i):
    """Tag of the i-th largest Hessian eigenvalue, 1-based."""
    return f"{EIGENVALUE_PREFIX}{i}"


def residual(i):
    return f"{RESIDUAL_PREFIX}{i}"


# An adaptive optimizer's curvature: lambda_i(P^-1 H), P its diagonal preconditioner.
PRECONDITIONED_EIGENVALUE_PREFIX = "hessian/preconditioned/eigenvalue_"
PRECONDITIONED_RESIDUAL_PREFIX = "hessian/preconditioned/residual_"
GD_EDGE_OF_STABILITY = "hessian/gd_edge_of_stability"
STABILITY_THRESHOLD = "hessian/stability_threshold"
GRADIENT_OVERLAP = "hessian/gradient_overlap"


def preconditioned_eigenvalue(i):
    """Tag of the i-th largest eigenvalue of P^-1 H, 1-based."""
    return f"{PRECONDITIONED_EIGENVALUE_PREFIX}{i}"


def preconditioned_residual(i):
    return f"{PRECONDITIONED_RESIDUAL_PREFIX}{i}"


# Per-layer curvature: the top eigenvalue of each layer's diagonal Hessian block.
LAYER_EIGENVALUE_PREFIX = "hessian/layer/eigenvalue_1/"
LAYER_RESIDUAL_PREFIX = "hessian/layer/residual_1/"


def layer_eigenvalue(layer):
    """Tag of the largest eigenvalue of `layer`'s diagonal Hessian block."""
    return f"{LAYER_EIGENVALUE_PREFIX}{sanitize(layer)}"


def layer_residual(layer):
    return f"{LAYER_RESIDUAL_PREFIX}{sanitize(layer)}"


def describe(tag):
    """One-line Markdown description of a gradmon tag ("" for a tag gradmon does not know).

    The one place built-in tags are described: statistics describe theirs through it
    (`Statistic.description`), and writers send the description with a tag's first value
    (`MetricWriter.write_scalars(..., descriptions=...)` for other texts)."""
    parts = tag.split("/")
    if tag in _FIXED_DESCRIPTIONS:
        return _FIXED_DESCRIPTIONS[tag]
    if tag.startswith(PRECONDITIONED_EIGENVALUE_PREFIX):
        return (f"{_index_ordinal(tag)} largest eigenvalue of P^-1 H, P the optimizer's "
                "diagonal preconditioner (its last update's); eigenvalue_1 is the preconditioned "
                "sharpness that decides an adaptive optimizer's stability (Cohen et al. 2022).")
    if tag.startswith(PRECONDITIONED_RESIDUAL_PREFIX):
        return (f"||Au - lambda u|| of eigenpair {tag.rsplit('_', 1)[1]} of A = P^-1/2 H P^-1/2 "
                "(unit u).")
    if tag.startswith(LAYER_EIGENVALUE_PREFIX):
        return (f"Largest eigenvalue of the Hessian block of layer `{tag[len(LAYER_EIGENVALUE_PREFIX):]}` "
                "(its own variables, the others held fixed) on the probe data; at most the sharpness.")
    if tag.startswith(LAYER_RESIDUAL_PREFIX):
        return (f"||H_LL v - lambda v|| of the top eigenpair of layer "
                f"`{tag[len(LAYER_RESIDUAL_PREFIX):]}`'s Hessian block (unit v).")
    if tag.startswith("hessian/eigenvalue_"):
        return (f"{_index_ordinal(tag)} largest (algebraic) eigenvalue of the Hessian "
                "of the loss on the probe data; eigenvalue_1 is the sharpness.")
    if tag.startswith("hessian/residual_"):
        return (f"||Hv - lambda v|| of eigenpair {tag.rsplit('_', 1)[1]} (unit v): bounds the "
                "eigenvalue's distance to the true spectrum.")
    if parts[0] == "penalties":
        if parts[-1] == "share" and len(parts) == 3:
            return f"Penalty `{parts[1]}` / total loss."
        if parts[-1] == "grad_norm" and len(parts) == 3:
            return f"Norm of penalty `{parts[1]}`'s own gradient contribution."
        return f"Value of penalty `{parts[1]}` added to the loss in this step."
    if tag.startswith(CLIP_FRACTION + "/"):
        return (f"Share of units clipped by the `{tag[len(CLIP_FRACTION) + 1:]}` member of the "
                "transform chain in this step.")
    if parts[0] == "gradients" and len(parts) >= 4:
        kind, stat, path = parts[1], parts[2], "/".join(parts[3:])
        if stat in _GROUP_STAT_DESCRIPTIONS:
            return _GROUP_STAT_DESCRIPTIONS[stat].format(kind=kind, path=path)
        if stat == "hist":
            return f"Distribution of the {kind} gradient entries of `{path}`."
    if parts[:2] == ["gradients", "snr"]:
        return (f"Signal-to-noise of the batch gradient of `{'/'.join(parts[2:])}`: "
                "B |G|^2 / tr(Sigma), from the two batch halves.")
    if parts[:2] == ["gradients", "grad_to_weight"]:
        return f"||raw gradient|| / ||weight|| of `{'/'.join(parts[2:])}` (NaN: undefined, zero weights)."
    if parts[0] == "optimizer" and len(parts) >= 4 and parts[1] in MOMENTS and parts[2] == "norm":
        return _MOMENT_NORM_DESCRIPTIONS[parts[1]].format(path="/".join(parts[3:]))
    if parts[:2] == ["gradients", "update_ratio"]:
        return (f"||w_after - w_before|| / ||w_before|| of `{'/'.join(parts[2:])}` over this "
                "optimizer step (NaN: undefined, zero weights).")
    if len(parts) == 3 and parts[0] == "gradients" and parts[2] == "threshold":
        return (f"ZClip threshold of the `{parts[1]}` transform member: mean + z_threshold * std of "
                "the recent global norms (EMA); a larger norm is clipped (NaN during the warm-up).")
    return ""


_MOMENT_NORM_DESCRIPTIONS = {
    FIRST_MOMENT: (
        "L2 norm of the optimizer's first-moment slots of `{path}`, as the optimizer holds them "
        "after this step: Adam/AdamW/Nadam/Adamax/Lion/Lamb `m` (average gradient), RMSprop "
        "`momentum` (of its steps), SGD `momentum` (-lr x the running sum: in weight units)."
    ),
    SECOND_MOMENT: (
        "sqrt(sum v) = ||sqrt(v)||, in gradient units, of the optimizer's second-moment slots v "
        "of `{path}` after this step: Adam/AdamW/Nadam/Lamb/RMSprop `v` (average squared "
        "gradient), Adagrad's accumulator (sum of squared gradients); Adamax: ||u|| (its "
        "infinity-norm average, already in gradient units)."
    ),
}

_FIXED_DESCRIPTIONS = {
    global_norm(RAW): "Global L2 norm of the raw (unscaled, untransformed) gradient.",
    global_norm(TRANSFORMED): "Global L2 norm of the gradient after the transform / optimizer clipping.",
    nonfinite_total(RAW): "Number of NaN or infinite entries in the raw gradient.",
    nonfinite_total(TRANSFORMED): "Number of NaN or infinite entries in the transformed gradient.",
    CLIP_RATIO: "||transformed gradient|| / ||raw gradient||; 1.0 means clipping left the step untouched.",
    CLIP_FRACTION: (
        "Share of clipped units in this step: tensors for clip_by_norm, elements for "
        "clip_by_value, output units for adaptive_clip, 1/0 for clip_by_global_norm "
        "(the largest member's share for a chain)."
    ),
    NO_GRADIENT: "Number of trainable variables that received no gradient in this step.",
    SKIPPED_STEPS: (
        "Steps so far whose update was not applied because the gradient had NaN/inf entries "
        "(LossScaleOptimizer skips, on_nonfinite='skip'/'stop') or was a spike (on_spike="
        "'skip'/'stop'); they count as unclipped."
    ),
    NONFINITE_STEPS: (
        "Steps so far whose update (the gradient the optimizer gets, after the transform) had "
        "NaN/inf entries, counted at every step, logged or not (loss-scale overflows left out): "
        "applied under on_nonfinite='warn', refused under 'skip'/'stop'."
    ),
    LOSS_SCALE: "Dynamic loss scale of the LossScaleOptimizer (mixed precision) at this step.",
    OVERFLOW_STEPS: (
        "Steps so far whose loss-scaled gradient overflowed (NaN/inf at a loss scale above 1): "
        "the LossScaleOptimizer skipped them and lowered its scale; not a gradient explosion."
    ),
    NOISE_SCALE: (
        "Simple gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018), "
        "unbiased two-batch-size estimate from this batch's halves; roughly the critical batch size."
    ),
    NOISE_GRAD_SQ: "Unbiased estimate of |G|^2, the squared norm of the true (full-data) gradient.",
    NOISE_TRACE_COV: "Unbiased estimate of tr(Sigma), the trace of the per-example gradient covariance.",
    NOISE_SCALE_EMA: "B_simple from exponential moving averages (decay 0.99) of tr(Sigma) and |G|^2.",
    LOSS_DATA: "The compiled loss (with Keras regularization losses), without gradmon penalties.",
    LOSS_TOTAL: "The loss optimized: data loss + gradmon penalties.",
    CONFIG: "How gradmon monitored this run (JSON): grouping, statistics, transform, policy.",
    REPORT: ("The `gradmon summary` health report of the run so far (flags, worst layers, spikes, "
             "skipped updates), written at each epoch end and at the end of fit / flush."),
    COSINE_UPDATE_GRADIENT: (
        "cos(w_after - w_before, -raw gradient) over all variables: 1 = the step went straight "
        "down the gradient (plain SGD), 0 = orthogonal, < 0 = uphill (momentum, preconditioning, "
        "weight decay and transforms turn it). NaN: undefined (no update applied, zero step)."
    ),
    COSINE_GRADIENT_FIRST_MOMENT: (
        "cos(raw gradient, the optimizer's first moment after this step) over all variables, "
        "the moment taken in gradient direction (SGD's momentum buffer, -lr x the running sum, "
        "negated). NaN: undefined (no update applied, zero vector)."
    ),
    HESSIAN_TRACE: "Hutchinson estimate of the Hessian trace (sum of all eigenvalues).",
    HESSIAN_TRACE_STDERR: "Standard error of the Hutchinson trace estimate.",
    HESSIAN_HVP_COUNT: "Hessian-vector products spent by this Hessian probe (per-layer block HVPs included).",
    EDGE_OF_STABILITY: (
        "Sharpness / the stability threshold of the optimizer in use: 1.0 is its edge of "
        "stability. lambda_1(H) / (2/lr) for SGD ((2 + 2 momentum)/lr heavy ball), "
        "lambda_1(P^-1 H) / ((2 + 2 beta_1)/((1 - beta_1) lr)) for Adam (Cohen et al. 2021, 2022); "
        "not written where no threshold is known."
    ),
    GD_EDGE_OF_STABILITY: (
        "lambda_1 * learning_rate / 2: 1.0 is the edge of stability of plain gradient descent "
        "(Cohen et al. 2021); for other optimizers see hessian/edge_of_stability."
    ),
    STABILITY_THRESHOLD: (
        "The sharpness at which the optimizer's update becomes unstable (2/lr for SGD, "
        "38/lr for Adam at beta_1 = 0.9, on lambda_1(P^-1 H) for adaptive optimizers)."
    ),
    GRADIENT_OVERLAP: (
        "Share of |g|^2 in the span of the top-k Hessian eigenvectors, g the probe-data "
        "gradient (Gur-Ari et al. 2018): near 1 when descent happens in the top subspace."
    ),
    HESSIAN_MIN_EIGENVALUE: "Smallest (most negative) Hessian eigenvalue on the probe data.",
    HESSIAN_DENSITY: "Spectral density of the Hessian (stochastic Lanczos quadrature), as probability mass per bucket.",
    SPIKE_ZSCORE: (
        "z-score of the log of the raw global gradient norm against its running mean and std "
        "before this step (EMA, alpha 0.97, after a 25-step warm-up; NaN during the warm-up and "
        "on a batch smaller than the largest seen, e.g. an epoch's partial last batch)."
    ),
    SPIKE_LOSS_ZSCORE: (
        "z-score of the batch loss against its running mean and std before this step (where "
        "gradmon's own train step computes the loss, or a custom loop hands it over with "
        "observe_loss; NaN during the warm-up and on a partial batch)."
    ),
    SPIKE_COUNT: "Gradient-norm spikes so far (z-score above the on_spike threshold, after the warm-up).",
    SPIKE_AT: "A gradient-norm spike, written at its own step; the value is its z-score.",
}


def group_names(variables, grouping, prefix=None):
    """Group of each variable and the distinct group names, unique as tags.

    Two paths that sanitise to the same tag (`a>b` and `a_b`) get distinct
    names (`a_b`, `a_b_2`): no series is silently merged into another. Under
    an observer named `prefix`, a leading `prefix/` is left out
    (`group_label`).
    """
    names, ids, by_path, taken = [], [], {}, set()
    for v in variables:
        path = getattr(v, "path", None) or v.name
        if grouping == "layer" and "/" in path:
            path = path.rsplit("/", 1)[0]
        path = group_label(path, prefix)
        if path not in by_path:
            name, n = sanitize(path), 1
            while name in taken:
                n += 1
                name = f"{sanitize(path)}_{n}"
            taken.add(name)
            by_path[path] = len(names)
            names.append(name)
        ids.append(by_path[path])
    return names, ids
