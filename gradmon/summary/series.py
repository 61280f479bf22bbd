"""Series arithmetic for the health report: pure functions of `(steps, values)` arrays.

A run is `{tag: (steps, values)}`; these pick the per-variable series of a
statistic, align series on their common steps, combine variables into a
layer (norms, grad/weight and update ratios), and take windows, peaks and
medians that ignore undefined values. Nothing here judges or displays.
"""

import math

import numpy as np

from gradmon import tags


def per_path(run, prefix):
    """`{path: series}` for the per-variable tags `prefix + path`, in logged order."""
    return {tag[len(prefix):]: series for tag, series in run.items()
            if tag.startswith(prefix) and len(tag) > len(prefix)}


def stat_prefix(kind, stat):
    return tags.group_stat(kind, stat, "")


def align(series_list):
    """`(steps, [len(series_list), len(steps)])` over the steps every series has."""
    steps = series_list[0][0]
    for s, _ in series_list[1:]:
        steps = np.intersect1d(steps, s)
    rows = [values[np.searchsorted(s, steps)] for s, values in series_list]
    return steps, np.array(rows, dtype=np.float64).reshape(len(series_list), len(steps))


def window(n, fraction):
    return max(1, math.ceil(fraction * n - 1e-9))


def peak(steps, values):
    """Largest value ignoring NaN (inf counts) and its step; NaN, None when all NaN."""
    known = ~np.isnan(values)
    if not known.any():
        return float("nan"), None
    i = np.flatnonzero(known)[np.argmax(values[known])]
    return float(values[i]), int(steps[i])



def layer_norm(series_by_var, names):
    steps, rows = align([series_by_var[n] for n in names])
    return steps, np.sqrt(np.sum(rows**2, axis=0))


def variable_sizes(norms, rms, names):
    """Entries per variable from (norm / rms)^2, or `None` when one cannot be recovered."""
    sizes = []
    for name in names:
        if name not in rms:
            return None
        _, (n, r) = align([norms[name], rms[name]])
        ok = np.isfinite(n) & np.isfinite(r) & (r > 0) & (n > 0)
        if not ok.any():
            return None
        sizes.append(round(float((n[ok][0] / r[ok][0]) ** 2)))
    return np.array(sizes, dtype=np.float64)


def weight_norms(norms, grad_to_weight):
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


def layer_ratios(names, norms, grad_to_weight, update_ratios):
    """`(steps, grad/weight, update ratio)` of a layer per step (module docstring); NaN where
    undefined or unknown, `None` for a ratio not logged for every variable."""
    has_g2w = all(n in grad_to_weight for n in names)
    has_update = all(n in update_ratios for n in names)
    if not (has_g2w or has_update):
        return None, None, None
    k = len(names)
    steps, rows = align([norms[n] for n in names]
                         + ([grad_to_weight[n] for n in names] if has_g2w else [])
                         + ([update_ratios[n] for n in names] if has_update else []))
    g = rows[:k]
    layer_g2w = layer_update = None
    with np.errstate(invalid="ignore", divide="ignore"):
        if has_g2w:
            w = weight_norms(g, rows[k:2 * k])
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


def final(values):
    """Last entry as a float, `None` when it is undefined (NaN)."""
    if values is None or not len(values) or not np.isfinite(values[-1]):
        return None
    return float(values[-1])



def finite_median(values):
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(np.median(values)) if len(values) else float("nan")

