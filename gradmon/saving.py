"""gradmon's own state in saved files, kept where plain Keras does not look.

What a monitored model saves must open without gradmon, and its weights must
load into the plain model. So gradmon's state (the step axis, the counters,
the spike detector's and zclip's running statistics and the largest batch the
detector has seen) is never one of the model's or the optimizer's variables:
it lives in a separate slot, `model.gradmon_state`, a `GradmonState` that

- Keras' `.keras` / `.weights.h5` saving walks as an attribute of the model
  (`gradmon_state/vars/state` in the H5 file); a plain model has no such
  attribute, so plain Keras never reads that entry;
- `tf.train.Checkpoint` tracks as a dependency of the model (one string
  tensor), so a run restored from a checkpoint continues its step axis.

On JAX and PyTorch the same slot rides in Keras' files (no `tf.train.Checkpoint`
there); the device variables are read and set through the backend's door (JAX:
the trainer's current state, `gradmon.backend.door_jax`).

The state is one small JSON document (host numbers), written at save time
from the observer's device variables and restored into them, or held until
the observer builds them (`apply_restored`, called by `Observer.ensure_built`).
"""

import json
import warnings
import weakref

import keras
import numpy as np

from keras.src.saving.keras_saveable import KerasSaveable

from gradmon.backend import lazy_tf as _lazy_tf

tf = _lazy_tf.tensorflow()
if _lazy_tf.is_tensorflow():
    from tensorflow.python.trackable import base as _trackable

    _Trackable = _trackable.Trackable
else:  # JAX / PyTorch: no tf.train.Checkpoint; Keras' files hold the state as on TensorFlow
    _Trackable = object

STATE_ATTRIBUTE = "gradmon_state"  # the model's attribute: the H5 path and the checkpoint name
_KEY = "state"
_COUNTERS = ("skipped", "overflow", "nonfinite")  # recorder counters, those the recorder has


def _read(observer, variable):
    """A state variable's value on the host (JAX: from the trainer's current state)."""
    if observer.recorder is not None:
        return np.asarray(observer.recorder.host_read(variable))
    return np.asarray(variable.numpy())


def _assign(observer, variable, value):
    """Sets a state variable from the host (JAX: the next step starts from it)."""
    if observer.recorder is not None and observer.recorder.door is not None:
        observer.recorder.host_assign(variable, value)
    else:
        variable.assign(np.asarray(value, keras.backend.standardize_dtype(variable.dtype)))


def observer_state(observer):
    """gradmon's state of `observer` as a JSON-able dict (host numbers; a few device reads)."""
    state = {"step": observer.step}
    rec = observer.recorder
    pending = getattr(observer, "_restored_state", None) or {}
    for name in _COUNTERS:
        variable = getattr(rec, name, None) if rec is not None else None
        if variable is not None:
            state[name] = _read(observer, variable).tolist()  # a count, or a vector of them
        elif name in pending:
            state[name] = pending[name]
    if rec is not None:  # how many of the non-finite steps counted were already warned of
        state["nonfinite_reported"] = observer.host.nonfinite_reported
    elif "nonfinite_reported" in pending:
        state["nonfinite_reported"] = pending["nonfinite_reported"]
    tracker = observer.spikes
    if tracker is not None:
        state["spikes"] = {"norm": _read(observer, tracker.norm_state).tolist(),
                           "count": int(_read(observer, tracker.count)),
                           "largest_batch": int(_read(observer, tracker.largest_batch))}
        if tracker.loss_state is not None:
            state["spikes"]["loss"] = _read(observer, tracker.loss_state).tolist()
    elif "spikes" in pending:
        state["spikes"] = pending["spikes"]
    zclips = [_read(observer, m.state).tolist() if m.state is not None else None for m in _zclips(observer)]
    if any(z is not None for z in zclips):
        state["zclip"] = zclips
    elif "zclip" in pending:
        state["zclip"] = pending["zclip"]
    return state


def _zclips(observer):
    from gradmon.measure import transforms

    transform = observer.transform
    if transform is None:
        return []
    return [m for m in transform.members() if isinstance(m, transforms.zclip)]


def restore_observer_state(observer, state):
    """Restores `observer_state`'s dict: now where the variables exist, else when they are built."""
    observer.restore_step(int(state.get("step", 0)))
    object.__setattr__(observer, "_restored_state", dict(state))
    if observer.recorder is not None:
        apply_restored(observer)


def apply_restored(observer):
    """Assigns a restored state's counters and running statistics to the built variables."""
    state = getattr(observer, "_restored_state", None)
    if not state or observer.recorder is None:
        return
    rec = observer.recorder
    for name in _COUNTERS:
        if name in state and getattr(rec, name, None) is not None:
            variable = getattr(rec, name)
            value = np.asarray(state[name], keras.backend.standardize_dtype(variable.dtype))
            if value.shape == tuple(variable.shape):
                _assign(observer, variable, value)
    if "nonfinite" in state:  # the steps counted before were warned of by the saving process
        count, first, last = state["nonfinite"]
        pending = last - first + 1 if first >= 0 else 0  # files of before: at most the range
        observer.host.nonfinite_reported = int(state.get("nonfinite_reported", max(count - pending, 0)))
    tracker, saved = observer.spikes, state.get("spikes")
    if tracker is not None and saved:
        _assign(observer, tracker.norm_state, np.asarray(saved["norm"], np.float64))
        _assign(observer, tracker.count, int(saved.get("count", 0)))
        observer.host.spikes_counted(int(saved.get("count", 0)))  # those were the saver's to read
        # full batches only are judged: a partial first batch after resuming is not one
        _assign(observer, tracker.largest_batch, int(saved.get("largest_batch", 0)))
        if tracker.loss_state is not None and "loss" in saved:
            _assign(observer, tracker.loss_state, np.asarray(saved["loss"], np.float64))
    zclips = _zclips(observer)
    saved_z = state.get("zclip") or []
    if len(saved_z) == len(zclips):
        for member, values in zip(zclips, saved_z):
            if values is not None and member.state is not None:
                _assign(observer, member.state, np.asarray(values, np.float64))
    object.__setattr__(observer, "_restored_state", None)


def _encode(state):
    return json.dumps(state, sort_keys=True)


def _decode(text):
    if isinstance(text, (bytes, np.bytes_)):
        text = bytes(text).decode("utf-8")
    return json.loads(text)


class GradmonState(KerasSaveable, _Trackable):
    """The slot holding a monitored model's gradmon state in its saved files.

    Keras' saving walks it as the model's `gradmon_state` attribute
    (`save_own_variables` / `load_own_variables`: one uint8 array holding the
    JSON document); `tf.train.Checkpoint` saves and restores it as one string
    tensor. It holds the model weakly and reads the model's current observer
    (`configure_gradients` replaces it).
    """

    def __init__(self, model):
        self._model = weakref.ref(model)

    def _obj_type(self):
        return "Layer"

    @property
    def _observer(self):
        model = self._model()
        return None if model is None else getattr(model, "_gradmon_observer", None)

    # -- Keras saving (.keras, .weights.h5) -------------------------------

    def save_own_variables(self, store):
        observer = self._observer
        if observer is not None:
            store[_KEY] = np.frombuffer(_encode(observer_state(observer)).encode("utf-8"), np.uint8)

    def load_own_variables(self, store):
        observer = self._observer
        if observer is not None and _KEY in list(store.keys()):
            restore_observer_state(observer, _decode(np.asarray(store[_KEY], np.uint8).tobytes()))

    # -- tf.train.Checkpoint --------------------------------------------------

    # Host numbers: read and restored eagerly. Where TensorFlow traces these (a SavedModel's
    # save/restore functions) the state is an empty document and restoring does nothing.

    def _serialize_to_tensors(self):
        observer = self._observer
        eager = tf.executing_eagerly()
        state = observer_state(observer) if observer is not None and eager else {}
        return {_KEY: tf.constant(_encode(state))}

    def _restore_from_tensors(self, restored_tensors):
        observer = self._observer
        if observer is not None and tf.executing_eagerly():
            state = _decode(restored_tensors[_KEY].numpy())
            if state:
                restore_observer_state(observer, state)
        return tf.no_op()


def attach(model):
    """Gives `model` its `gradmon_state` slot (once): saved by Keras and by `tf.train.Checkpoint`."""
    from gradmon.backend import keras_compat as _keras_compat

    slot = model.__dict__.get(STATE_ATTRIBUTE)
    if not isinstance(slot, GradmonState):
        slot = GradmonState(model)
        object.__setattr__(model, STATE_ATTRIBUTE, slot)  # not a layer: Keras' tracker skips it
    if _lazy_tf.is_tensorflow():  # JAX / PyTorch: Keras' files only (no tf.train.Checkpoint)
        _keras_compat.track_for_checkpoint(model, STATE_ATTRIBUTE, slot)
    return slot


def serializable(transform):
    """Whether `transform` and each of its members is a built-in gradmon transform (a chain of
    them included): only those are written in a model's config."""
    from gradmon.measure import transforms

    members = [transform] + list(transform.members())
    return all(type(m).__name__ in transforms._REGISTRY for m in members)


def describe(transform):
    """A transform as a user wrote it: a plain callable by its name, a chain by its members."""
    from gradmon.measure import transforms

    if isinstance(transform, transforms.chain):
        return "chain(" + ", ".join(describe(t) for t in transform.transforms) + ")"
    fn = getattr(transform, "fn", None)
    if fn is not None:
        return f"`{getattr(fn, '__qualname__', None) or transform.name}` (a plain callable)"
    return repr(transform)


def warn_unsaved(observer, where):
    """Warns (every save: each file lacks it) of a transform or statistics the file cannot hold."""
    lost = []
    t = observer.transform
    if t is not None and not serializable(t):
        lost.append(f"the gradient transform {describe(t)}")
    if observer.custom:
        lost.append(f"the custom statistics {[type(s).__name__ for s in observer.custom]}")
    if lost:
        warnings.warn(
            f"gradmon: {' and '.join(lost)} cannot be saved ({where}); a model loaded from it "
            "trains without them. Use a transform from gradmon.transforms (they are saved), or "
            "pass it again with gradmon.monitor(model, transform=...) / configure_gradients after loading.",
            stacklevel=4)
