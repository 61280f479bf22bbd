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
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
    if not p.endswith("ARCHITECTURE.md"))  # being redrawn for the new folders (issue 17)

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
