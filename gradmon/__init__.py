"""gradmon: gradient monitoring, clipping and curvature for Keras 3 / TensorFlow."""

from gradmon import hessian, penalties, stats, tags, transforms
from gradmon.callbacks import GradientMonitor, HessianMonitor
from gradmon.monitored import STAT_NAMES, GradientMonitorMixin, monitor

__version__ = "0.1.0"

__all__ = [
    "GradientMonitor",
    "GradientMonitorMixin",
    "HessianMonitor",
    "STAT_NAMES",
    "hessian",
    "monitor",
    "penalties",
    "stats",
    "tags",
    "transforms",
]
