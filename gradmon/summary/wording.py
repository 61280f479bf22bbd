"""How the health report writes numbers, shares and lists, in findings and renderings alike."""

import math


MAX_LISTED = 5  # default number of layers named in one finding (the rest counted)


def fmt_num(x):
    """`x` to 4 significant digits; "nan", "inf" as such; "-" for `None`."""
    if x is None:
        return "-"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


def fmt_pct(x):
    """A share as a whole percentage; "-" for `None`."""
    return "-" if x is None else f"{x:.0%}"


def fmt_list(names, limit):
    """The first `limit` names, then a count of the rest ("... and 94 more")."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} ... and {len(names) - limit} more"


def spikes_detail(spikes, limit):
    """The spikes note: their count and the first `limit` steps with their z-scores."""
    listed = [f"{s} (z {fmt_num(z)})" for s, z in zip(spikes.steps, spikes.zscores)]
    detail = f"{spikes.count} gradient-norm spike(s)"
    if listed:
        detail += f", largest first: step {fmt_list(listed, limit)}"
    if spikes.count > len(listed):
        detail += f"; {spikes.count - len(listed)} without their step in the event files"
    return detail

