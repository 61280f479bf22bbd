"""A health report displayed: plain text (`gradmon summary`), Markdown (TensorBoard's Text
tab) and JSON (`gradmon summary --json`). Reads `HealthReport`s; judges nothing."""

import dataclasses
import itertools
import math

import numpy as np

from gradmon import tags
from gradmon.summary.health import CLIPPING, GD_EDGE, SPIKES
from gradmon.summary.wording import MAX_LISTED, fmt_list, fmt_num, fmt_pct, spikes_detail
from gradmon._validation import check_positive_int


def _ratio(value, logged):
    if not logged:
        return "-"
    return "undefined" if value is None else fmt_num(value)


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
            detail = f.detail + (f"; {label}: {fmt_list(f.layers, max_listed)}" if f.layers else "")
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
    rows = [[name, fmt_num(t.first), fmt_num(t.last), fmt_num(t.max)] for name, t in named if t is not None]
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
        listed = [f"{name} {fmt_num(value)}" for name, value in c.layer_eigenvalues.items()]
        out.append(f"per-layer top eigenvalue (last probe, largest first): {fmt_list(listed, max_listed)}")
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
    out += _layer_table(report) + _table_legend(report)
    if report.curvature is not None:
        out += _curvature_text(report.curvature, max_listed)
    o = report.optimizer
    if o is not None:
        out += ["", f"optimizer state (medians over the last {fmt_pct(report.thresholds.tail_fraction)} "
                    f"of steps): cos(update, -gradient) {fmt_num(o.cosine_update_gradient)}, "
                    f"cos(gradient, first moment) {fmt_num(o.cosine_gradient_first_moment)}"]
    out += [""] + _findings_text("flags", report.flags, max_listed)
    if report.notes:
        notes = [dataclasses.replace(f, detail=spikes_detail(report.spikes, max_listed))
                 if f.kind == SPIKES and report.spikes is not None else f for f in report.notes]
        out += _findings_text("notes", notes, max_listed)
    return "\n".join(out)


def _layer_table(report):
    """The table's lines: one row per layer, then the whole model's."""
    s = report.summary
    header = ["layer", "final norm", "peak norm", "peak step", "clipped", "non-finite",
              "grad/weight", "update ratio", "zeros"]
    rows = [[l.name, fmt_num(l.final_norm), fmt_num(l.peak_norm), fmt_num(l.peak_step),
             fmt_pct(l.clipped_share), str(l.nonfinite_steps),
             _ratio(l.final_grad_to_weight, l.grad_to_weight_logged),
             _ratio(l.final_update_ratio, l.update_ratio_logged),
             fmt_pct(l.tail_zero_fraction)] for l in report.layers]
    rows.append(["(global)", fmt_num(s.final_norm), fmt_num(s.peak_norm), fmt_num(s.peak_step),
                 fmt_pct(s.clipped_share), str(_global_nonfinite(s)), "", "", ""])
    return _rows_text(header, rows)


def _global_nonfinite(summary):
    """The (global) row's non-finite steps: the updates with NaN/inf values counted at every
    step (`gradients/nonfinite_steps`, as the exploding flag counts them) when the run wrote
    that counter, or the logged steps with a NaN/inf raw gradient when they are more."""
    return max(summary.nonfinite_steps, summary.nonfinite_updates or 0)


def _table_legend(report):
    """What the table's columns were computed from, and the steps left out."""
    s = report.summary
    source = {"layer": "per layer, transformed vs raw norms",
              "global": "global clip ratio / fraction",
              "none": "no transform logged"}[report.clipping_source]
    out = ["", f"norms: raw gradient L2; early median {fmt_num(s.early_median_norm)} (finite "
               f"values); clipped: {source}; zeros: mean over the last "
               f"{fmt_pct(report.thresholds.tail_fraction)} of steps"]
    if _global_nonfinite(s) != s.nonfinite_steps:
        out.append(f"non-finite: per layer, logged steps with a NaN/inf raw gradient; (global): every "
                   f"step counted (`{tags.NONFINITE_STEPS}`: {s.nonfinite_updates} update(s), "
                   f"{s.nonfinite_steps} at logged steps)")
    if s.excluded_steps:
        out.append(f"left out: {len(s.excluded_steps)} loss-scale overflow step(s)")
    if report.grouping_source == "inferred":
        out.append(f"rows: the run recorded no grouping (`{tags.CONFIG}`: an older run, or a file "
                   f"started after its directory was removed); inferred from its tags: "
                   f"grouping=\"{report.grouping}\" (--grouping overrides)")
    return out


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
    out = _markdown_headline(report)
    out += [f"WARNING: {_md(p.message)}  " for p in report.read_problems]
    out += _markdown_findings(report, max_listed)
    out += _markdown_worst_layers(report, max_listed)
    out += ["#### Spikes and skipped updates", ""] + (_markdown_events(report, run, max_listed)
                                                      or ["- none"]) + [""]
    out += ["#### The full report (`gradmon summary`)", "", "```",
            format_table(report, max_listed=max_listed), "```"]
    return "\n".join(out)


def _markdown_headline(report):
    """The title, and the number and kinds of flags and notes."""
    s = report.summary
    who = "" if getattr(report, "name", None) is None else f" of optimizer `{report.name}`"
    counts = []
    for title, findings in (("flag", report.flags), ("note", report.notes)):
        kinds = [k.upper() for k, _ in itertools.groupby(findings, key=lambda f: f.kind)]
        n = len(findings)
        counts.append(f"**{n} {title}{'s' if n != 1 else ''}**" + (f": {', '.join(kinds)}" if kinds else ""))
    return [f"### gradmon health report{who}: steps {s.first_step}-{s.last_step} ({s.logged_steps} logged)",
            "", " &middot; ".join(counts), ""]


def _markdown_findings(report, max_listed):
    """The flags and the notes, each with its explanation; past `max_listed` of a kind, a count."""
    out = []
    for title, findings in (("Flags", report.flags), ("Notes", report.notes)):
        if not findings:
            continue
        out += [f"#### {title}", ""]
        for kind, group in itertools.groupby(findings, key=lambda f: f.kind):
            group = list(group)
            for f in group[:max_listed]:
                detail = f.detail
                if f.kind == SPIKES and report.spikes is not None:
                    detail = spikes_detail(report.spikes, max_listed)
                if f.layers:
                    detail += f"; layers: {fmt_list(f.layers, max_listed)}"
                out.append(f"- **{f.kind.upper()}** [{_md(f.subject)}] {_md(detail)}<br>"
                           f"*{_md(f.explanation)}*")
            if len(group) > max_listed:
                out.append(f"- ... and {len(group) - max_listed} more {kind.upper()} layers")
        out.append("")
    return out


def _worst_layers(report, max_listed):
    """`(layers, {layer name: why})`: the flagged layers first, then a few of the largest and
    smallest final norms, at most `2 * max_listed` in all."""
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
    return worst, flagged


def _markdown_worst_layers(report, max_listed):
    """The worst layers (`_worst_layers`) as a Markdown table; nothing when there are none."""
    worst, flagged = _worst_layers(report, max_listed)
    if not worst:
        return []
    out = [f"#### Worst layers ({len(worst)} of {len(report.layers)})", "",
           "| layer | why | final norm | peak norm | peak step | update ratio | zeros |",
           "|---|---|---:|---:|---:|---:|---:|"]
    for l in worst:
        out.append(f"| {_md(l.name)} | {', '.join(flagged.get(l.name, []))} | {fmt_num(l.final_norm)} | "
                   f"{fmt_num(l.peak_norm)} | {fmt_num(l.peak_step)} | "
                   f"{_ratio(l.final_update_ratio, l.update_ratio_logged)} | {fmt_pct(l.tail_zero_fraction)} |")
    return out + [""]


def _markdown_events(report, run, max_listed):
    """Bullets for the spikes, non-finite gradients and updates, skipped updates and
    loss-scale overflows of the run (empty when it had none)."""
    s = report.summary
    events = []
    if report.spikes is not None:
        events.append(f"- spikes: {_md(spikes_detail(report.spikes, max_listed))}")
    if s.nonfinite_steps:
        events.append(f"- logged steps with a NaN/inf raw gradient: {s.nonfinite_steps}, the first at step "
                      f"{fmt_num(s.first_nonfinite_step)}")
    updates = getattr(s, "nonfinite_updates", None)
    if updates:
        events.append(f"- updates with a non-finite gradient (every step counted): {updates}")
    skipped = _skipped_steps(run)
    if skipped:
        events.append(f"- updates not applied ({tags.SKIPPED_STEPS}), at logged steps: "
                      f"{_md(fmt_list([str(x) for x in skipped], max_listed))}")
    if s.excluded_steps:
        events.append(f"- loss-scale overflow steps (left out): "
                      f"{fmt_list([str(x) for x in s.excluded_steps], max_listed)}")
    return events


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
