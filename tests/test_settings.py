"""One settings object: the entry points' keywords are its fields, checked in one place."""

import dataclasses
import inspect

import keras
import pytest

import gradmon
from gradmon.measure.settings import GradientSettings
from gradmon.monitored import GradientMonitorMixin

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)


def _keywords(function, prefix=""):
    """`{option: default}` of `function`'s parameters named `prefix + option`."""
    out = {}
    for parameter in inspect.signature(function).parameters.values():
        if parameter.name.startswith(prefix) and parameter.default is not inspect.Parameter.empty:
            out[parameter.name[len(prefix):]] = parameter.default
    return out


@pytest.mark.parametrize("function, entry, prefix, others", [
    (gradmon.monitor, "model", "", set()),
    (GradientMonitorMixin.configure_gradients, "model", "", set()),
    (GradientMonitorMixin.__init__, "model", "gradient_", set()),
    (gradmon.observe, "observe", "", {"log_dir", "update_freq", "histogram_freq"}),
])
def test_each_entry_point_takes_the_settings_fields_with_their_defaults(function, entry, prefix, others):
    taken = _keywords(function, prefix)
    assert set(taken) - others == set(GradientSettings.options(entry))
    assert {k: v for k, v in taken.items() if k not in others} == GradientSettings.defaults(entry)
    # each option's docs name it
    doc = function.__doc__ or GradientMonitorMixin.__doc__  # the mixin's keywords: in its class
    for option in GradientSettings.options(entry):
        assert f"`{prefix}{option}`" in doc or f"{option}:" in doc


def test_the_settings_are_frozen_and_normalised():
    settings = GradientSettings(stats=["update_ratio", "norm"], penalties=None)
    # names in STAT_NAMES order, as the tags are laid out
    assert settings.selected == tuple(s for s in gradmon.STAT_NAMES if s in ("norm", "update_ratio"))
    assert settings.penalties == () and settings.custom == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.grouping = "variable"
    clip = gradmon.transforms.clip_by_global_norm(1.0)
    assert settings.replace(transform=clip).transform is clip
    assert settings.replace(stats="all").selected == tuple(gradmon.STAT_NAMES)


def test_a_plain_callable_is_wrapped_once():
    def halve(grads, params):
        return [g * 0.5 for g in grads]

    settings = GradientSettings(transform=halve)
    assert settings.transform.fn is halve
    assert settings.replace(grouping="variable").transform is settings.transform


@pytest.mark.parametrize("options, message", [
    ({"grouping": "row"}, "Invalid value for argument `grouping`"),
    ({"on_nonfinite": "ignore"}, "Invalid value for argument `on_nonfinite`"),
    ({"on_spike": "never"}, "Invalid value for argument `on_spike`"),
    ({"spike_threshold": -1}, "Invalid value for argument `spike_threshold`"),
    ({"stats": ["no_such_stat"]}, "Invalid value for argument `stats`"),
    ({"name": ""}, "Invalid value for argument `name`"),
    ({"buffer_steps": 65537}, "Invalid value for argument `buffer_steps`"),
    ({"noise_scale": "yes"}, "Invalid value for argument `noise_scale`"),
    ({"penalties": [3]}, "Invalid value for argument `penalties`"),
    ({"transform": 3}, "Invalid value for argument `transform`"),
])
def test_every_entry_point_refuses_what_the_settings_refuse(options, message):
    with pytest.raises(ValueError, match=message):
        GradientSettings(**options)
    model_only, observe_only = {"penalties", "noise_scale"}, {"name", "buffer_steps"}
    (option,) = options
    if option not in observe_only:
        with pytest.raises(ValueError, match=message):
            gradmon.monitor(keras.Sequential([keras.layers.Dense(1)]), **options)
    if option not in model_only:
        with pytest.raises(ValueError, match=message):
            gradmon.observe(keras.optimizers.SGD(0.1), **options)


def test_the_first_invalid_option_is_named_first():
    # the checks run in one order: transform, on_nonfinite, on_spike, spike_threshold, ...
    with pytest.raises(ValueError, match="`on_nonfinite`"):
        GradientSettings(on_nonfinite="x", grouping="y")
    with pytest.raises(ValueError, match="`grouping`"):
        GradientSettings(grouping="y", stats=["z"])
