"""A griffe extension for the API reference: `Example:` sections read as `Examples:`.

gradmon's docstrings head their doctest examples `Example:` (Google style, as Keras
does); griffe parses only `Examples:` into code and renders `Example:` as a note,
where the `>>>` lines would read as Markdown block quotes. Loaded by mkdocs.yml.
"""

import re

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class SingularExamples(griffe.Extension):
    def on_instance(self, *, obj, **kwargs):
        docstring = getattr(obj, "docstring", None)
        if docstring is not None:
            docstring.value = _SINGULAR.sub(r"\1Examples:", docstring.value)
