"""What is done with an optimizer's gradients: one settings object, validated in one place.

`gradmon.monitor`, `GradientMonitorMixin` (its `gradient_*` keywords),
`configure_gradients` and `gradmon.observe` take these options as keyword
arguments, build one `GradientSettings` from them and pass it on: the
observer, the pipeline and a monitored model's config read it, and nothing
else lists the options. A new option is a field here (its default, which
entry points take it, its check in `__post_init__`) plus its line in those
entry points' signatures and docs (`tests/test_settings.py` checks that the
signatures agree with the fields).
"""

import dataclasses

from gradmon import tags
from gradmon._validation import (check_bool, check_choice, check_non_negative_int, check_positive,
                                 invalid)
from gradmon.measure import penalties as penalties_module
from gradmon.measure import statistics, transforms
from gradmon.measure.pipeline import NONFINITE_POLICIES, SPIKE_POLICIES
from gradmon.measure.spikes import DEFAULT_SPIKE_THRESHOLD

GROUPINGS = ("variable", "layer")
MAX_BUFFER_STEPS = 65536  # and the ring's bytes at most `recorder.MAX_RING_BYTES`

# which entry points take an option: "model" (`monitor`, the mixin, `configure_gradients`),
# "observe" (`gradmon.observe`)
_BOTH, _MODEL, _OBSERVE = ("model", "observe"), ("model",), ("observe",)


def _option(default, takes):
    return dataclasses.field(default=default, metadata={"takes": takes})


@dataclasses.dataclass(frozen=True, eq=False)
class GradientSettings:
    """The options of one observed optimizer (or monitored model), checked once.

    Attributes:
        transform: the gradient transform (`gradmon.transforms`; a plain callable
            comes back wrapped), or `None`.
        grouping: `"layer"` or `"variable"`.
        stats: the statistics: names (in `STAT_NAMES` order) then `Statistic` instances.
        penalties: a tuple of `gradmon.penalties.Penalty` (models only).
        noise_scale: estimate the gradient noise scale (models only).
        on_nonfinite: `"warn"`, `"skip"` or `"stop"`.
        on_spike: `None`, `"warn"`, `"skip"` or `"stop"`.
        spike_threshold: the z-score above which a norm is a spike.
        name: the tag prefix, or `None` (`observe` only).
        buffer_steps: logged steps held on the device between two reads (`observe` only).
    """

    transform: object = _option(None, _BOTH)
    grouping: str = _option("layer", _BOTH)
    stats: object = _option(None, _BOTH)
    penalties: tuple = _option(None, _MODEL)
    noise_scale: bool = _option(False, _MODEL)
    on_nonfinite: str = _option("warn", _BOTH)
    on_spike: object = _option(None, _BOTH)
    spike_threshold: float = _option(DEFAULT_SPIKE_THRESHOLD, _BOTH)
    name: object = _option(None, _OBSERVE)
    buffer_steps: int = _option(16, _OBSERVE)

    def __post_init__(self):
        # in the order the checks ran before the settings were one object (the first error wins)
        set_ = lambda field, value: object.__setattr__(self, field, value)  # noqa: E731 (frozen)
        if self.transform is not None:
            set_("transform", transforms.as_transform(self.transform))
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        if self.on_spike is not None and (not isinstance(self.on_spike, str)
                                          or self.on_spike not in SPIKE_POLICIES):
            raise invalid("on_spike", f"None or one of {list(SPIKE_POLICIES[1:])}", self.on_spike)
        set_("spike_threshold", check_positive("spike_threshold", self.spike_threshold))
        check_choice("grouping", self.grouping, GROUPINGS)
        selected, custom = statistics.check_stats(self.stats)
        set_("stats", tuple(selected) + tuple(custom))
        name = self.name
        if name is not None and (not isinstance(name, str) or not _sanitized(name)):
            raise invalid("name", "a non-empty string (a tag prefix) or None", name)
        set_("buffer_steps", max(1, check_non_negative_int("buffer_steps", self.buffer_steps)))
        if self.buffer_steps > MAX_BUFFER_STEPS:
            raise invalid("buffer_steps", f"at most {MAX_BUFFER_STEPS} logged steps held on the "
                          "device (call flush() more often instead)", self.buffer_steps)
        set_("noise_scale", check_bool("noise_scale", self.noise_scale))
        set_("penalties", penalties_module.check_penalties(self.penalties))

    @property
    def selected(self):
        """The built-in statistics' names, in `STAT_NAMES` order."""
        return tuple(s for s in self.stats if isinstance(s, str))

    @property
    def custom(self):
        """The `Statistic` instances given."""
        return [s for s in self.stats if isinstance(s, statistics.Statistic)]

    @classmethod
    def options(cls, entry):
        """The option names `entry` (`"model"` or `"observe"`) takes, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls) if entry in f.metadata["takes"])

    @classmethod
    def defaults(cls, entry):
        """`{option: default}` of the options `entry` takes."""
        return {f.name: f.default for f in dataclasses.fields(cls) if entry in f.metadata["takes"]}

    @classmethod
    def pick(cls, arguments, entry, prefix=""):
        """`{option: value}` of the options `entry` takes, found in `arguments` (an entry
        point's `locals()`, or keyword arguments) under `prefix` (the mixin's `gradient_`)."""
        return {name: arguments[prefix + name] for name in cls.options(entry)
                if prefix + name in arguments}

    @classmethod
    def from_arguments(cls, arguments, entry, prefix=""):
        """The settings of the options `entry` takes, read from `arguments` (`pick`)."""
        return cls(**cls.pick(arguments, entry, prefix))

    def keywords(self, entry, prefix=""):
        """These settings as the keyword arguments of `entry` (e.g. the mixin's, `gradient_`)."""
        return {prefix + name: getattr(self, name) for name in self.options(entry)}

    def replace(self, **changes):
        """A copy with `changes` (checked again)."""
        return dataclasses.replace(self, **changes)


def _sanitized(name):
    return bool(tags.sanitize(name).strip("_"))
