"""Tag descriptions come from one place (`gradmon.tags.describe`) and travel with the write:
every built-in statistic describes its tags through it, with the wording TensorBoard showed."""

import gradmon.monitored  # noqa: F401 - first (importing statistics first trips the class registration)
from gradmon import tags
from gradmon.measure import statistics
import pytest

pytestmark = pytest.mark.tensorflow_only  # needs TensorFlow: skipped whole under JAX/PyTorch (conftest.py)

GROUPS = ["dense", "dense_1"]
SPEC = statistics.Spec(GROUPS, [0, 1], has_transform=True, fraction_names=["clip_by_norm", "zclip"],
                       loss_scaled=True, penalty_names=["weight"], noise_scale=True,
                       moment_slots={tags.FIRST_MOMENT: (None, 1.0), tags.SECOND_MOMENT: (None, False)})


def described(statistic):
    return {statistic.tag(label): statistic.description(label) for label in statistic.labels(SPEC)}


def test_every_built_in_statistic_is_described_by_its_tag():
    seen = {}
    for statistic in statistics.default_statistics():
        if statistic.active(SPEC):
            seen.update(described(statistic))
    assert len(seen) > 30
    assert {tag: tags.describe(tag) for tag in seen} == seen
    assert all(seen.values()), [tag for tag, text in seen.items() if not text]


def test_the_wording_tensorboard_showed_is_kept():
    """What the statistics' own copies said (they won over `tags.describe` before)."""
    assert described(statistics.GradToWeight())[tags.grad_to_weight("dense")] == \
        "||raw gradient|| / ||weight|| of `dense` (NaN: undefined, zero weights)."
    assert described(statistics.UpdateRatio())[tags.update_ratio("dense_1")] == \
        "||w_after - w_before|| / ||w_before|| of `dense_1` over this optimizer step (NaN: undefined, zero weights)."
    fractions = described(statistics.ClipFraction())
    assert fractions[tags.clip_fraction_of("zclip")] == \
        "Share of units clipped by the `zclip` member of the transform chain in this step."
    assert fractions[tags.CLIP_FRACTION].startswith("Share of clipped units in this step")
    assert described(statistics.GradientMoment("rms", tags.TRANSFORMED))[
        tags.group_stat(tags.TRANSFORMED, "rms", "dense")] == \
        "Root mean square of the transformed gradient of `dense` (norm / sqrt(size))."


def test_a_users_statistic_keeps_its_own_description():
    class Mine(statistics.Statistic):
        name = "mine"

        def tag(self, label):
            return "gradients/mine"

        def description(self, label):
            return "my own words"

    plain = type("Plain", (statistics.Statistic,), {"tag": lambda self, label: "gradients/plain"})()
    assert described(Mine()) == {"gradients/mine": "my own words"}
    assert described(plain) == {"gradients/plain": ""}  # a tag gradmon does not know


def test_no_global_registry_and_a_named_observers_tags_are_described(tmp_path):
    """A named observer's tags (`critic/gradients/...`, which `tags.describe` does not know) get
    their statistics' descriptions in the file: sent with the write, not kept in `gradmon.tags`."""
    import os

    import keras
    import numpy as np

    import gradmon
    from helpers import read_descriptions

    assert not hasattr(tags, "register_descriptions") and not hasattr(tags, "_REGISTERED")
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    opt = gradmon.observe(keras.optimizers.SGD(0.1), log_dir=str(tmp_path), name="critic",
                          stats=["norm", "grad_to_weight"])
    x = np.ones((4, 3), np.float32)
    for _ in range(2):
        with __import__("tensorflow").GradientTape() as tape:
            loss = keras.ops.mean(model(x) ** 2)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    opt.gradmon.close()
    descriptions = {}
    for root, _, files in os.walk(str(tmp_path)):
        if any(f.startswith("events.out.tfevents") for f in files):
            descriptions.update(read_descriptions(root))
    global_norm = tags.prefixed("critic", tags.global_norm(tags.RAW))
    assert descriptions[global_norm] == tags.describe(tags.global_norm(tags.RAW))
    assert tags.describe(global_norm) == ""  # known only through the write
    layer = model.trainable_variables[0].path.rsplit("/", 1)[0]
    ratio = tags.prefixed("critic", tags.grad_to_weight(layer))
    assert descriptions[ratio] == tags.describe(tags.grad_to_weight(layer))  # in its per-layer run too
