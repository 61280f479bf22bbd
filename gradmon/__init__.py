"""gradmon: gradient monitoring, clipping and curvature for Keras 3 / TensorFlow.

Attributes are imported lazily, so that `import gradmon.report` (and
`gradmon summary`) start without importing TensorFlow.
"""

import importlib

__version__ = "0.1.0"

_ATTRIBUTES = {
    "GradientCheckReport": "gradmon.gradcheck",
    "assert_gradients_close": "gradmon.gradcheck",
    "check_gradients": "gradmon.gradcheck",
    "GradientMonitor": "gradmon.callbacks",
    "HessianMonitor": "gradmon.hessian_monitor",
    "GradientMonitorMixin": "gradmon.monitored",
    "STAT_NAMES": "gradmon.monitored",
    "monitor": "gradmon.monitored",
    "observe": "gradmon.observer",
    "Statistic": "gradmon.statistics",
}
_SUBMODULES = ("hessian", "layer_curvature", "penalties", "stats", "statistics", "tags", "transforms", "observer",
               "pipeline", "report", "writer", "layout", "spikes", "preconditioner")

__all__ = sorted(list(_ATTRIBUTES) + list(_SUBMODULES))


def __getattr__(name):
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"gradmon.{name}")
    else:
        raise AttributeError(f"module 'gradmon' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
