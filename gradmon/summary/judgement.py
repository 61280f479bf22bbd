"""The judgement of a health report: flags (problems) and notes (worth knowing).

`health_report` measures one observer's series (`analysis.measure`) and judges
them against `Thresholds`; `health_reports` does so for every observer of a
run. The rules, flag by flag, are in `gradmon.summary.report`'s docstring.
"""

import math

import numpy as np

from gradmon import tags
import gradmon.summary.analysis as analysis
import gradmon.summary.series as series
from gradmon.summary.events import NoGradmonLogs, observer_names
from gradmon.summary.health import (
    AT_EDGE_OF_STABILITY, CLIPPING, DEAD, EDGE_OF_STABILITY, EXPLODING, GD_EDGE, GROUPING_CHOICES,
    INACTIVE, LOSS_SCALE_OVERFLOW, NONFINITE, SPIKES, VANISHING, Flag, HealthReport, Thresholds)
from gradmon.summary.wording import MAX_LISTED, fmt_list, fmt_num, fmt_pct, spikes_detail
from gradmon._validation import check_choice, invalid


_ONLY = object()  # health_report's default observer: the unnamed one, or the run's only one


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
    observer = _observer_name(run, name)
    run = analysis.observer_run(run, observer)
    grouping, source = analysis.resolve_grouping(run, grouping)
    measured = analysis.measure(run, thresholds, grouping)
    flags, notes = judge(measured, thresholds)
    return HealthReport(summary=measured.summary, layers=measured.layers, curvature=measured.curvature,
                        flags=flags, notes=notes, clipping_source=measured.clipping_source,
                        thresholds=thresholds, read_problems=list(getattr(run, "problems", [])),
                        spikes=measured.spikes, optimizer=measured.optimizer, name=observer,
                        grouping=grouping, grouping_source=source, overlaps=list(run.overlaps))


def _observer_name(run, name):
    """The observer `health_report` judges: `name`, or for `_ONLY` the unnamed one or the
    run's only one; raises when the run has no such observer."""
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
    return name


def judge(measured, thresholds):
    """`(flags, notes)` of an `analysis.Measured`; per-layer findings of one kind come worst
    first. A layer poisoned by NaN is flagged as such only: not dead, not vanishing."""
    run, summary = measured.run, measured.summary
    poisoned = {name: why for name, why in measured.poisoned.items() if why}
    flags = [f for f in [_exploding(summary, thresholds, run)] if f]
    notes = [f for f in [_overflow_note(summary, run)] if f]
    nonfinite, dead, inactive = _zero_findings(measured.layers, poisoned, measured.dead_norm, thresholds)
    flags += nonfinite + dead
    notes += inactive
    alive = [l for l in measured.layers if l.name not in {f.subject for f in dead} | set(poisoned)]
    flags += _vanishing(alive, measured.layers, thresholds)
    flags += [f for f in [_clipping(summary, measured.layer_clipped_tail, thresholds)] if f]
    flags, notes = _judge_curvature(measured.curvature, run, thresholds, flags, notes)
    if measured.spikes is not None and measured.spikes.count:
        notes.append(Flag(SPIKES, "global", spikes_detail(measured.spikes, MAX_LISTED)))
    return flags, notes


def _exploding(summary, thresholds, run):
    """The exploding flag (a norm far above its early median, non-finite updates or
    gradients, a loss scale below 1), or `None`."""
    limit = thresholds.explode_factor * summary.early_median_norm
    blown = [label for label, value in (("final", summary.final_norm), ("peak", summary.peak_norm))
             if math.isfinite(limit) and limit > 0 and value > limit]
    scale = summary.final_loss_scale
    parts = []
    if blown:
        parts.append(f"raw global norm {fmt_num(summary.peak_norm)} peak (step "
                     f"{summary.peak_step}), {fmt_num(summary.final_norm)} final: above "
                     f"{fmt_num(thresholds.explode_factor)} x early median "
                     f"{fmt_num(summary.early_median_norm)}")
    if summary.nonfinite_updates:
        since, by = summary.nonfinite_updates_since, summary.first_nonfinite_update_by
        when = f"at step {by}" if since + 1 == by else f"between steps {since + 1} and {by}"
        parts.append(f"{summary.nonfinite_updates} update(s) with NaN/inf values "
                     f"(`{tags.NONFINITE_STEPS}`, counted at every step), the first {when}")
    if summary.nonfinite_steps:
        parts.append(f"{summary.nonfinite_steps} step(s) with NaN/inf gradients, first at "
                     f"step {summary.first_nonfinite_step}")
        if _all_skipped_without_scale(run):
            parts.append(f"all of them skipped (`{tags.SKIPPED_STEPS}`): if this run used mixed "
                         f"precision, it predates `{tags.LOSS_SCALE}` and these may be loss-scale "
                         "overflows, which this run cannot tell from explosions")
    if scale is not None and scale < 1:
        parts.append(f"loss scale fell to {fmt_num(scale)} (< 1): the gradient overflows float16 "
                     "even unscaled")
    return Flag(EXPLODING, "global", "; ".join(parts)) if parts else None


def _all_skipped_without_scale(run):
    """Whether every non-finite step was skipped in a run that logged no loss scale."""
    if tags.SKIPPED_STEPS not in run or tags.LOSS_SCALE in run or tags.OVERFLOW_STEPS in run:
        return False
    counted, _ = analysis.nonfinite_steps(run)
    s, count = run[tags.SKIPPED_STEPS]
    skipped = set(s[np.diff(count, prepend=0.0) > 0].tolist())
    return bool(counted) and counted <= skipped


def _overflow_note(summary, run):
    """The note of the steps a LossScaleOptimizer skipped, or `None`."""
    if not summary.overflow_steps:
        return None
    if tags.OVERFLOW_STEPS in run:
        s, count = run[tags.OVERFLOW_STEPS]
        rose = [str(step) for step in s[np.diff(count, prepend=0.0) > 0].tolist()]
        detail = (f"{summary.overflow_steps} step(s) skipped by the LossScaleOptimizer "
                  f"(`{tags.OVERFLOW_STEPS}` rose by step(s) {fmt_list(rose, 5)})")
    else:
        detail = (f"{summary.overflow_steps} step(s) with NaN/inf gradients while "
                  f"`{tags.LOSS_SCALE}` fell: skipped by the LossScaleOptimizer")
    if summary.excluded_steps:
        detail += (f"; logged step(s) {fmt_list([str(s) for s in summary.excluded_steps], 5)} "
                   "left out of the statistics")
    if tags.LOSS_SCALE in run:
        scales = run[tags.LOSS_SCALE][1]
        detail += f"; loss scale {scales[0]:g} -> {scales[-1]:g}"
    return Flag(LOSS_SCALE_OVERFLOW, "global", detail)


def _zero_findings(layers, poisoned, dead_norm, thresholds):
    """`(nonfinite flags, dead flags, inactive notes)`: layers poisoned by NaN, then layers
    whose gradient is (almost) all exact zeros, then mostly zeros; worst first."""
    tail_text = f"over the last {fmt_pct(thresholds.tail_fraction)} of steps"
    nonfinite = [Flag(NONFINITE, layer.name, f"{poisoned[layer.name]} {tail_text}")
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
                                          f"{fmt_pct(thresholds.dead_zero_fraction)})")))
    return (nonfinite, [f for _, f in sorted(dead, key=lambda x: x[0])],
            [f for _, f in sorted(inactive, key=lambda x: x[0])])


def _vanishing(alive, layers, thresholds):
    """Vanishing flags of the `alive` layers (neither dead nor poisoned), smallest ratio
    first: on update ratios when defined for at least two of them, else on final norms
    against the largest of all `layers`."""
    by_update = [l for l in alive if l.tail_update_ratio is not None]
    update_reference = series.finite_median([l.tail_update_ratio for l in by_update])
    finals = [l.final_norm for l in layers if math.isfinite(l.final_norm)]
    norm_reference = max(finals, default=float("nan"))
    vanishing = []
    for layer in alive:
        if (layer.tail_update_ratio is not None and len(by_update) >= 2
                and math.isfinite(update_reference) and update_reference > 0):
            ratio = layer.tail_update_ratio / update_reference
            detail = (f"update ratio {fmt_num(layer.tail_update_ratio)} (median of the tail) < "
                      f"{fmt_num(thresholds.vanish_ratio)} x the layers' median "
                      f"{fmt_num(update_reference)}; evidence: update ratios")
        elif math.isfinite(norm_reference) and norm_reference > 0:
            ratio = layer.final_norm / norm_reference
            detail = (f"final norm {fmt_num(layer.final_norm)} < {fmt_num(thresholds.vanish_ratio)} x "
                      f"largest layer's {fmt_num(norm_reference)}; evidence: raw gradient norms "
                      f"({_why_not_updates(layer)})")
        else:
            continue
        if ratio < thresholds.vanish_ratio:  # the same judgement on either evidence
            vanishing.append((ratio, Flag(VANISHING, layer.name, detail)))
    return [f for _, f in sorted(vanishing, key=lambda x: x[0])]


def _why_not_updates(layer):
    if not layer.update_ratio_logged:
        return "no update ratios logged"
    if layer.tail_update_ratio is None:
        return "its update ratio is undefined"
    return "update ratios defined for fewer than 2 layers"


def _clipping(summary, layer_clipped_tail, thresholds):
    """The persistent-clipping flag, naming the layers clipped that often; or `None`."""
    share = summary.tail_clipped_share
    if share is None or share < thresholds.clip_share:
        return None
    detail = (f"{share:.0%} of the last {fmt_pct(thresholds.tail_fraction)} of steps clipped "
              f"(threshold {fmt_pct(thresholds.clip_share)})")
    often = sorted((name for name, s in layer_clipped_tail.items() if s >= thresholds.clip_share),
                   key=lambda name: -layer_clipped_tail[name])
    if layer_clipped_tail and not often:
        detail += "; no single layer clipped that often"
    return Flag(CLIPPING, "global", detail, layers=often)


def _judge_curvature(curvature, run, thresholds, flags, notes):
    """Past / at the edge of stability, judged on `hessian/edge_of_stability` (module docstring)."""
    if curvature is None or tags.EDGE_OF_STABILITY not in run:
        return flags, notes
    _, eos = run[tags.EDGE_OF_STABILITY]
    tail = eos[-series.window(len(eos), thresholds.tail_fraction):]
    if curvature.edge_of_stability_meaning == GD_EDGE:
        if np.all(tail > thresholds.edge_of_stability):
            flags.append(Flag(EDGE_OF_STABILITY, "global",
                              f"lr * lambda_1 / 2 {_over_probes(tail)} "
                              f"(threshold {fmt_num(thresholds.edge_of_stability)}); an older run: its "
                              f"`{tags.EDGE_OF_STABILITY}` is lr * lambda_1 / 2, the edge of plain "
                              "gradient descent, not the optimizer's own"))
        return flags, notes
    which = curvature.edge_of_stability_on or "sharpness"
    if np.all(tail > thresholds.edge_of_stability):
        flags.append(Flag(EDGE_OF_STABILITY, "global",
                          f"{which} / the optimizer's threshold {_over_probes(tail)} (over the edge above "
                          f"{fmt_num(thresholds.edge_of_stability)})"))
    elif np.nanmax(tail, initial=-np.inf) >= thresholds.at_edge_of_stability:
        notes.append(Flag(AT_EDGE_OF_STABILITY, "global",
                          f"{which} / the optimizer's threshold {_over_probes(tail, median=True)}: "
                          f"at the edge from {fmt_num(thresholds.at_edge_of_stability)}"))
    return flags, notes


def _over_probes(values, median=False):
    """What a ratio read at the last probes: "1.3 at the last Hessian probe" for one value,
    "between 1.25 and 1.4 (median ...) at the last 2 Hessian probes" for several."""
    if len(values) == 1:
        return f"{fmt_num(values[0])} at the last Hessian probe"
    middle = f" (median {fmt_num(series.finite_median(values))})" if median else ""
    return (f"between {fmt_num(np.nanmin(values))} and {fmt_num(np.nanmax(values))}{middle} "
            f"at the last {len(values)} Hessian probes")
