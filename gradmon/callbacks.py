"""Keras callbacks that schedule and write gradmon's statistics. They compute nothing."""

import keras

from gradmon import monitored, tags
from gradmon._validation import check_non_negative_int, invalid
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
    continues across `fit` calls). Tags are listed in `gradmon.tags`.

    Args:
        log_dir: directory of the TensorBoard run.
        update_freq: write scalars every this many training steps, or
            `"epoch"` to write the last step's statistics at each epoch end.
            Statistics are only computed on the steps that are written.
            Defaults to `1`.
        histogram_freq: write gradient histograms every this many training
            steps; `0` disables them. Defaults to `0`.

    Example:
        >>> model = gradmon.monitor(model)
        >>> model.compile(optimizer="adam", loss="mse")
        >>> model.fit(x, y, callbacks=[gradmon.GradientMonitor("runs/exp1", histogram_freq=50)])
    """

    def __init__(self, log_dir, update_freq=1, histogram_freq=0):
        super().__init__()
        if not isinstance(log_dir, (str, bytes)) and not hasattr(log_dir, "__fspath__"):
            raise invalid("log_dir", "a path", log_dir)
        self.log_dir = str(log_dir)
        self.update_freq = _check_update_freq(update_freq)
        self.histogram_freq = check_non_negative_int("histogram_freq", histogram_freq)
        self._writer = SummaryWriter(f"{self.log_dir}/train")
        self._last_step = self._last_hist_step = -1

    def set_model(self, model):
        _check_monitored(model, "GradientMonitor")
        super().set_model(model)
        state = model.gradient_state
        state.log_every.assign(1 if self.update_freq == "epoch" else self.update_freq)
        state.hist_every.assign(self.histogram_freq)

    def on_train_begin(self, logs=None):
        self._writer.open()  # an unwritable log_dir fails before the first step
        self._last_step = self._last_hist_step = -1

    def on_train_batch_end(self, batch, logs=None):
        if self.update_freq != "epoch":
            self._write_latest()

    def on_epoch_end(self, epoch, logs=None):
        self._write_latest()
        self._writer.flush()

    def on_train_end(self, logs=None):
        self._write_latest()
        self._writer.close()

    def _write_latest(self):
        state = self.model.gradient_state
        snapshot = state.read()
        if snapshot is not None and snapshot["step"] != self._last_step:
            self._last_step = snapshot["step"]
            self._writer.write_scalars(snapshot["step"], scalar_summaries(state, snapshot))
        if self.histogram_freq:
            latest = state.read_histograms()
            if latest is not None and latest[0] != self._last_hist_step:
                self._last_hist_step = latest[0]
                self._writer.write_histograms(latest[0], histogram_summaries(state, latest[1]))


def scalar_summaries(state, snapshot):
    """`{tag: value}` for one `MonitorState.read()` snapshot."""
    config = state.config
    values = snapshot["global"]
    out = {
        tags.global_norm(tags.RAW): values["raw_global_norm"],
        tags.nonfinite_total(tags.RAW): values["raw_nonfinite"],
        tags.NO_GRADIENT: values["no_gradient"],
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
