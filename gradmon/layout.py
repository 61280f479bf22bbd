"""The TensorBoard custom-scalars layout for gradmon's tags.

Charts select tags by regular expression, built from `gradmon.tags` so the
layout follows the tag names wherever they change.
"""

import re

from tensorboard.plugins.custom_scalar import layout_pb2

from gradmon import tags


def _exact(tag):
    return "^" + re.escape(tag) + "$"


def _prefix(tag_prefix):
    return "^" + re.escape(tag_prefix)


def _chart(title, *regexes):
    return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=list(regexes)))


def build_layout():
    """A `layout_pb2.Layout` with "Gradients", "Penalties" and "Curvature" categories."""
    gradients = layout_pb2.Category(title="Gradients", chart=[
        _chart("global norm: raw vs transformed",
               _exact(tags.global_norm(tags.RAW)), _exact(tags.global_norm(tags.TRANSFORMED))),
        _chart("clip ratio and clip fraction", _exact(tags.CLIP_RATIO), _prefix(tags.CLIP_FRACTION)),
        _chart("per-layer raw norms", _prefix(tags.group_stat(tags.RAW, "norm", ""))),
        _chart("per-layer transformed norms", _prefix(tags.group_stat(tags.TRANSFORMED, "norm", ""))),
        _chart("update / weight ratio", _prefix(tags.update_ratio(""))),
        _chart("gradient / weight ratio", _prefix(tags.grad_to_weight(""))),
        _chart("non-finite entries and skipped steps",
               _exact(tags.nonfinite_total(tags.RAW)), _exact(tags.SKIPPED_STEPS)),
        _chart("gradient noise scale", _exact(tags.NOISE_SCALE), _exact(tags.NOISE_SCALE_EMA)),
    ])
    penalties = layout_pb2.Category(title="Penalties", chart=[
        _chart("data vs total loss", _exact(tags.LOSS_DATA), _exact(tags.LOSS_TOTAL)),
        _chart("penalty values", _prefix(tags.penalty("")) + r"[^/]+$"),
        _chart("penalty share of the loss", _prefix(tags.penalty("")) + r"[^/]+/share$"),
        _chart("penalty gradient norms", _prefix(tags.penalty("")) + r"[^/]+/grad_norm$"),
    ])
    curvature = layout_pb2.Category(title="Curvature", chart=[
        _chart("top eigenvalues", _prefix(tags.EIGENVALUE_PREFIX) + r"\d+$",
               _exact(tags.HESSIAN_MIN_EIGENVALUE)),
        _chart("edge of stability (lambda_1 * lr / 2)", _exact(tags.EDGE_OF_STABILITY)),
        _chart("trace", _exact(tags.HESSIAN_TRACE)),
        _chart("eigenpair residuals", _prefix(tags.RESIDUAL_PREFIX) + r"\d+$"),
    ])
    return layout_pb2.Layout(category=[gradients, penalties, curvature])
