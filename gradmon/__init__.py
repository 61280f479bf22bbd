"""gradmon: gradient monitoring, clipping and curvature for Keras 3 / TensorFlow."""

from gradmon import hessian, penalties, stats, tags, transforms
from gradmon.callbacks import GradientMonitor
from gradmon.hessian_monitor import HessianMonitor
from gradmon.gradcheck import GradientCheckReport, assert_gradients_close, check_gradients
from gradmon.monitored import STAT_NAMES, GradientMonitorMixin, monitor

__version__ = "0.1.0"

__all__ = [
    "GradientCheckReport",
    "GradientMonitor",
    "GradientMonitorMixin",
    "HessianMonitor",
    "STAT_NAMES",
    "assert_gradients_close",
    "check_gradients",
    "hessian",
    "monitor",
    "penalties",
    "stats",
    "tags",
    "transforms",
]
