"""Keras callbacks that schedule and write gradmon's statistics. They compute nothing."""

import warnings

import keras
import numpy as np

from gradmon import _distribute, monitored, tags
from gradmon._validation import check_choice, check_non_negative_int, invalid, warn_once
from gradmon.layout import build_layout
from gradmon.writer import SummaryWriter, histogram_buckets


def _check_update_freq(update_freq):
    if update_freq == "epoch":
        return update_freq
    if isinstance(update_freq, bool) or not isinstance(update_freq, int) or update_freq < 1:
        raise invalid("update_freq", 'a positive integer (steps) or "epoch"', update_freq)
    return update_freq


def _check_monitored(model, callback):
    if not isinstance(model, monitored.GradientMonitorMixin):
        raise ValueError(
            f"{callback} needs a monitored model. Expected a model returned by "
            "`gradmon.monitor(model)` or one using `gradmon.GradientMonitorMixin`. "
            f"Received: model={type(model).__name__}"
        )


class GradientMonitor(keras.callbacks.Callback):
    """Writes gradient statistics of a monitored model to TensorBoard.

    Summaries go to `<log_dir>/train`, the run directory that
    `keras.callbacks.TensorBoard(log_dir)` uses, so both show up as one run;
    the step is the number of training steps this model has taken (it
    continues across `fit` calls, and across saving and loading). Tags are
    listed in `gradmon.tags`. With `steps_per_execution > 1` every logged
    step is still written at its own step; histograms are taken at most once
    per execution (the latest scheduled one).

    Under `tf.distribute` strategies the statistics are those of the
    all-reduced gradient (see `gradmon.monitor`) and are written once per
    step; with `MultiWorkerMirroredStrategy` every worker runs this callback,
    and only the chief writes (the others create no event file, but still
    stop training on non-finite gradients under `on_nonfinite="stop"`).

    Args:
        log_dir: directory of the TensorBoard run.
        update_freq: write scalars every this many training steps, or
            `"epoch"` to write the last step's statistics at each epoch end.
            Statistics are only computed on the steps that are written.
            Defaults to `1`.
        histogram_freq: write gradient histograms every this many training
            steps; `0` disables them. Defaults to `0`.
        on_nonfinite: what a step with NaN/inf gradients does: `"warn"`
            (applied, as in Keras; warned once), `"skip"` (not applied,
            training goes on) or `"stop"` (not applied, `fit` ends with a
            message naming the variables). `None` keeps the model's own
            setting (`monitor(..., on_nonfinite=...)`). Defaults to `None`.

    Example:
        >>> model = gradmon.monitor(model)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> model.fit(x, y, callbacks=[gradmon.GradientMonitor("runs/exp1", histogram_freq=50)])
    """

    def __init__(self, log_dir, update_freq=1, histogram_freq=0, on_nonfinite=None):
        super().__init__()
        if not isinstance(log_dir, (str, bytes)) and not hasattr(log_dir, "__fspath__"):
            raise invalid("log_dir", "a path", log_dir)
        self.log_dir = str(log_dir)
        self.update_freq = _check_update_freq(update_freq)
        self.histogram_freq = check_non_negative_int("histogram_freq", histogram_freq)
        if on_nonfinite is not None:
            check_choice("on_nonfinite", on_nonfinite, monitored.NONFINITE_POLICIES)
        self.on_nonfinite = on_nonfinite
        self._writer = SummaryWriter.shared(f"{self.log_dir}/train")
        self._writes = True
        self._last_step = self._last_hist_step = -1
        self.stopped_at = None
        self._layout_written = False

    def set_model(self, model):
        _check_monitored(model, "GradientMonitor")
        super().set_model(model)
        state = model.gradient_state
        state.log_every.assign(1 if self.update_freq == "epoch" else self.update_freq)
        state.hist_every.assign(self.histogram_freq)
        if self.histogram_freq:
            state.histograms_requested = True  # rebuilds the train function once
        if self.on_nonfinite is not None and model.gradient_config.on_nonfinite != self.on_nonfinite:
            model.gradient_config.on_nonfinite = self.on_nonfinite  # rebuilds the train function

    def on_train_begin(self, logs=None):
        # under multi-worker training only the chief writes
        self._writes = _distribute.is_chief(self.model.distribute_strategy)
        if self._writes:
            self._writer.open()  # an unwritable log_dir fails before the first step
        if self._writes and not self._layout_written:
            self._writer.write_custom_scalar_layout(build_layout())
            self._layout_written = True
        self._last_step = self._last_hist_step = -1
        self.stopped_at = None

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq != "epoch":
            self._write_latest()
        elif self.model.gradient_config.on_nonfinite == "stop":
            latest = self.model.gradient_state.read()
            if latest is not None and _has_nonfinite(latest) and self.stopped_at is None:
                self._write_latest()

    def on_epoch_end(self, epoch, logs=None):
        self._write_latest(every_step=self.update_freq != "epoch")

    def on_train_end(self, logs=None):
        self._write_latest(every_step=self.update_freq != "epoch")
        if self._writes:
            self._writer.close()

    def _write_latest(self, every_step=True):
        state = self.model.gradient_state
        snapshots = [s for s in state.read_all() if s["step"] > self._last_step]
        if not every_step:
            snapshots = snapshots[-1:]
        policy = self.model.gradient_config.on_nonfinite
        for snapshot in snapshots:
            self._last_step = snapshot["step"]
            if self._writes:
                self._writer.write_scalars(snapshot["step"], scalar_summaries(state, snapshot))
            if _has_nonfinite(snapshot):
                self._nonfinite(state, snapshot, policy)
        if self.histogram_freq:
            latest = state.read_histograms()
            if latest is not None and latest[0] != self._last_hist_step and self._writes:
                self._last_hist_step = latest[0]
                self._writer.write_histograms(latest[0], histogram_summaries(state, latest[1]))

    def _nonfinite(self, state, snapshot, policy):
        column = monitored.RAW_COLUMNS.start + tags.GROUP_STATS.index("nonfinite")
        bad = [name for name, row in zip(snapshot["groups"], snapshot["group_stats"]) if row[column] > 0]
        message = (f"gradmon: non-finite gradients at step {snapshot['step']} in {bad} "
                   f"(policy on_nonfinite={policy!r}")
        if policy == "stop":
            if self.stopped_at is None:
                self.stopped_at = snapshot["step"]
                self.model.stop_training = True
                message += "): the update was not applied and training stops."
                warnings.warn(message, stacklevel=2)
                print(message)
        elif policy == "skip":
            warn_once(("nonfinite-skip", id(self.model)), message + "): such steps are skipped; "
                      f"their number is logged as `{tags.SKIPPED_STEPS}`.")
        else:
            warn_once(("nonfinite-warn", id(self.model)), message + "): the update was applied. "
                      "Use on_nonfinite='skip' or 'stop' to protect the weights.")


def _has_nonfinite(snapshot):
    return snapshot["global"]["raw_nonfinite"] > 0 or not np.isfinite(snapshot["global"]["raw_global_norm"])


def scalar_summaries(state, snapshot):
    """`{tag: value}` for one `MonitorState.read()` snapshot."""
    config = state.config
    values = snapshot["global"]
    out = {
        tags.global_norm(tags.RAW): values["raw_global_norm"],
        tags.nonfinite_total(tags.RAW): values["raw_nonfinite"],
        tags.NO_GRADIENT: values["no_gradient"],
        tags.SKIPPED_STEPS: values["skipped_steps"],
    }
    kinds = [(tags.RAW, monitored.RAW_COLUMNS)]
    if state.has_transform:
        kinds.append((tags.TRANSFORMED, monitored.TRANSFORMED_COLUMNS))
        out[tags.global_norm(tags.TRANSFORMED)] = values["transformed_global_norm"]
        out[tags.nonfinite_total(tags.TRANSFORMED)] = values["transformed_nonfinite"]
        out[tags.CLIP_RATIO] = values["clip_ratio"]
        out[tags.CLIP_FRACTION] = values["clip_fraction"]
        if len(snapshot["fractions"]) > 1:
            for name, fraction in snapshot["fractions"].items():
                out[tags.clip_fraction_of(name)] = fraction
    if snapshot["losses"] is not None:
        out[tags.LOSS_DATA] = snapshot["losses"]["data"]
        out[tags.LOSS_TOTAL] = snapshot["losses"]["total"]
    if snapshot["noise"] is not None:
        out[tags.NOISE_SCALE] = snapshot["noise"]["noise_scale"]
        out[tags.NOISE_SCALE_EMA] = snapshot["noise"]["noise_scale_ema"]
        for group, value in zip(snapshot["groups"], snapshot["noise"]["snr"]):
            out[tags.snr(group)] = value
    for name, numbers in snapshot["penalties"].items():
        out[tags.penalty(name)] = numbers["value"]
        out[tags.penalty_share(name)] = numbers["share"]
        out[tags.penalty_grad_norm(name)] = numbers["grad_norm"]
    rows = snapshot["group_stats"]
    for i, group in enumerate(snapshot["groups"]):
        for kind, columns in kinds:
            row = rows[i, columns]
            for j, stat in enumerate(tags.GROUP_STATS):
                if stat in config.stats:
                    out[tags.group_stat(kind, stat, group)] = row[j]
        if "grad_to_weight" in config.stats:
            out[tags.grad_to_weight(group)] = rows[i, monitored.GRAD_TO_WEIGHT_COLUMN]
        if "update_ratio" in config.stats:
            out[tags.update_ratio(group)] = snapshot["update_ratio"][i]
    return out


def histogram_summaries(state, histograms):
    """`{tag: buckets}` for `MonitorState.read_histograms()`' array."""
    kinds = [tags.RAW, tags.TRANSFORMED] if state.has_transform else [tags.RAW]
    out = {}
    for k, kind in enumerate(kinds):
        for i, group in enumerate(state.group_names):
            low, high, counts = histograms[k, i, 0], histograms[k, i, 1], histograms[k, i, 2:]
            out[tags.histogram(kind, group)] = histogram_buckets(low, high, counts)
    return out
