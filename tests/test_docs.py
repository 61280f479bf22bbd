"""What the documentation cites exists: files, public names, the quick-start commands.

`make docs` (mkdocs build --strict) checks the site's links, anchors and API reference;
this checks what it cannot: the prose. The README and the pages under docs/ name test
files, examples, benchmarks and public names such as `gradmon.transforms.zclip`; a rename
in the package must not leave them pointing at nothing.
"""

import glob
import importlib
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "examples/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))

FILE = re.compile(r"\b((?:tests|examples|benchmarks|docs|gradmon)/[\w/.-]*\.(?:py|md|png))")
NAME = re.compile(r"`(gradmon(?:\.[A-Za-z_]\w*)+)")


def read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def cited(pattern):
    """`{cited string: [documents citing it]}` over every documentation file."""
    out = {}
    for doc in DOCS:
        for match in pattern.findall(read(doc)):
            out.setdefault(match, []).append(doc)
    return out


def resolve(dotted):
    """The object `dotted` names (`gradmon.transforms.zclip`), through gradmon's lazy attributes."""
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:  # a submodule not imported yet
            obj = importlib.import_module(".".join(parts[:i + 1]))
    return obj


def test_the_cited_files_exist():
    files = cited(FILE)
    assert "tests/test_saving.py" in files and "examples/custom_loop.py" in files  # the pattern finds them
    missing = {f: docs for f, docs in files.items() if not os.path.exists(os.path.join(ROOT, f))}
    assert not missing, missing


def test_the_cited_public_names_exist():
    names = cited(NAME)
    assert "gradmon.transforms.zclip" in names and "gradmon.hessian.spectrum" in names
    missing = {}
    for name, docs in sorted(names.items()):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            missing[name] = (docs, repr(error))
    assert not missing, missing


def test_a_name_that_does_not_exist_is_found_missing():
    with pytest.raises((ImportError, AttributeError)):
        resolve("gradmon.transforms.no_such_transform")


def test_the_readme_quick_start_commands_are_make_targets():
    readme, makefile = read("README.md"), read("Makefile")
    targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.MULTILINE))
    for command in re.findall(r"^make (\w+)", readme, re.MULTILINE) + ["docs"]:
        assert command in targets, (command, sorted(targets))
    assert "make docs" in read(".ci/run")


def statistic_example():
    """The code blocks of docs/ARCHITECTURE.md's "How to add a statistic" section."""
    text = read("docs/ARCHITECTURE.md")
    section = text[text.index("## How to add a statistic"):]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_statistic_example_uses_public_names_only():
    import ast

    import gradmon

    definition = statistic_example()[0]
    for node in ast.walk(ast.parse(definition)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                assert alias.name in ("keras", "numpy", "gradmon") or alias.name == "keras.ops", alias.name
        elif isinstance(node, ast.ImportFrom):
            assert node.module in ("keras", "gradmon"), node.module
            assert all(a.name in gradmon.__all__ or node.module == "keras" for a in node.names)
    used = set(re.findall(r"\bgradmon\.(\w+)", definition))
    assert used and used <= set(gradmon.__all__), used - set(gradmon.__all__)


@pytest.mark.tensorflow_only
def test_the_statistic_example_writes_what_numpy_computes(tmp_path):
    """The documented custom statistic, run as the section shows it (an instance in `stats=`),
    against a numpy replay of the same Adam steps; its description reaches TensorBoard; and a
    custom statistic's name is refused by `stats=`, as the section says."""
    import keras
    import numpy as np
    import tensorflow as tf

    import gradmon
    from helpers import read_descriptions, read_events

    namespace = {}
    exec(statistic_example()[0], namespace)
    statistic = namespace["UpdateCosine"]()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="tanh", name="a"),
                              keras.layers.Dense(1, name="b")])
    opt = gradmon.observe(keras.optimizers.Adam(0.01), log_dir=str(tmp_path), stats=["norm", statistic])
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 4)).astype("float32"), rng.normal(size=(8, 1)).astype("float32")
    expected = {}
    for step in (1, 2, 3):
        before = [v.numpy().copy() for v in model.trainable_variables]
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        for layer in ("a", "b"):
            index = [i for i, v in enumerate(model.trainable_variables) if v.path.split("/")[-2] == layer]
            g = np.concatenate([grads[i].numpy().ravel() for i in index])
            d = np.concatenate([(model.trainable_variables[i].numpy() - before[i]).ravel() for i in index])
            expected[(layer, step)] = float(-g @ d / (np.linalg.norm(g) * np.linalg.norm(d)))
    opt.flush()
    events = read_events(str(tmp_path / "train"))
    descriptions = read_descriptions(str(tmp_path / "train"))
    for layer in ("a", "b"):
        tag = statistic.tag(f"{model.name}/{layer}")
        assert tag in events, sorted(events)
        for step in (1, 2, 3):
            assert events[tag][step] == pytest.approx(expected[(layer, step)], rel=1e-4)
        assert descriptions[tag] == statistic.description(f"{model.name}/{layer}")
    with pytest.raises(ValueError, match="stats"):
        gradmon.observe(keras.optimizers.Adam(), stats=["norm", statistic.name])
