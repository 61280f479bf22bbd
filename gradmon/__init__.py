"""gradmon: gradient monitoring, clipping and curvature for Keras 3 / TensorFlow.

Attributes are imported lazily, so that `import gradmon.report` (and
`gradmon summary`) start without importing TensorFlow.
"""

import importlib
import sys

__version__ = "0.1.0"

_ATTRIBUTES = {
    "GradientCheckReport": "gradmon.gradcheck",
    "assert_gradients_close": "gradmon.gradcheck",
    "check_gradients": "gradmon.gradcheck",
    "GradientMonitor": "gradmon.publish.callbacks",
    "HessianMonitor": "gradmon.hessian.monitor",
    "GradientMonitorMixin": "gradmon.monitored",
    "STAT_NAMES": "gradmon.monitored",
    "monitor": "gradmon.monitored",
    "observe": "gradmon.measure.observer",
    "Statistic": "gradmon.measure.statistics",
}
# Public modules, by their short names (`gradmon.transforms.zclip`, `gradmon.hessian.spectrum`).
_SUBMODULES = {
    "hessian": "gradmon.hessian",
    "layer_curvature": "gradmon.hessian.per_layer",
    "preconditioner": "gradmon.hessian.preconditioner",
    "penalties": "gradmon.measure.penalties",
    "transforms": "gradmon.measure.transforms",
    "statistics": "gradmon.measure.statistics",
    "stats": "gradmon.measure.moments",
    "spikes": "gradmon.measure.spikes",
    "observer": "gradmon.measure.observer",
    "pipeline": "gradmon.measure.pipeline",
    "writer": "gradmon.publish.writer",
    "layout": "gradmon.publish.layout",
    "report": "gradmon.summary.report",
    "summary": "gradmon.summary",
    "tags": "gradmon.tags",
}

__all__ = sorted(list(_ATTRIBUTES) + list(_SUBMODULES))


def __getattr__(name):
    if name in _ATTRIBUTES:
        value = getattr(importlib.import_module(_ATTRIBUTES[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    else:
        raise AttributeError(f"module 'gradmon' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__


# -- registering gradmon's saved model classes with Keras -------------------------------
# A `.keras` file of `gradmon.monitor(model)` names gradmon's registered classes; Keras
# finds them only if `gradmon.monitored` was imported. That import needs TensorFlow, which
# `import gradmon` must not pull in (`gradmon summary`): so it happens as soon as Keras and
# TensorFlow are both imported, now or later (a hook on their first import).

_REGISTRATION_TRIGGERS = ("keras", "tensorflow")
_registered = False


def _imported(name, finished=None):
    module = sys.modules.get(name)
    if module is None:
        return False
    return name == finished or not getattr(getattr(module, "__spec__", None), "_initializing", False)


def _gradmon_initializing(finished=None):
    """Whether a gradmon module is half imported (importing `gradmon.monitored` now would cycle)."""
    return any(name.startswith("gradmon.") and not _imported(name, finished)
               for name in list(sys.modules))


def _register_models(finished=None):
    """Imports `gradmon.monitored` (registering its classes) once Keras and TensorFlow are in.

    When Keras' import comes from a gradmon module still being imported (`import
    gradmon.measure.statistics` first), registering waits until that module is done.
    """
    global _registered
    if _registered or not all(_imported(n, finished) for n in _REGISTRATION_TRIGGERS):
        return
    if _gradmon_initializing(finished):
        return  # retried when the gradmon module being imported finishes (`_AfterImport`)
    _registered = True
    for finder in [f for f in sys.meta_path if isinstance(f, _AfterImport)]:
        sys.meta_path.remove(finder)
    try:
        importlib.import_module("gradmon.monitored")
    except Exception as error:  # never break the user's import of Keras
        import warnings

        warnings.warn(f"gradmon: could not register its model classes with Keras ({error!r}); "
                      "`import gradmon.monitored` before loading a monitored model.")


class _AfterImport:
    """A `sys.meta_path` finder that runs `_register_models` after Keras' / TensorFlow's first import."""

    def find_spec(self, fullname, path=None, target=None):
        if _registered or not (fullname in _REGISTRATION_TRIGGERS or fullname.startswith("gradmon.")):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_then_register(module):
            try:
                exec_module(module)
            finally:
                loader.__dict__.pop("exec_module", None)
            _register_models(finished=fullname)

        loader.exec_module = exec_then_register
        return spec


if all(n in sys.modules for n in _REGISTRATION_TRIGGERS):
    _register_models()
if not _registered:
    sys.meta_path.insert(0, _AfterImport())
