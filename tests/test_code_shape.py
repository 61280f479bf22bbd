"""The package's shape, read from its source (`ast`, nothing imported), on every backend.

- No import cycle anywhere in `gradmon`, package `__init__` re-exports included
  (tests/test_import_graph.py holds the finer rules of the gradient side).
- No function over 60 code lines and no class over 300 (docstrings, comments and
  blank lines not counted): a longer one holds more than one idea.
"""

import ast
import io
import pathlib
import tokenize

import gradmon
from test_import_graph import _cycle, _imports, _modules

ROOT = pathlib.Path(gradmon.__file__).parent
MAX_FUNCTION, MAX_CLASS = 60, 300


def _code_lines(source):
    """The numbers of the lines that hold code (a token other than a comment or a newline)."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER}
    lines = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    return lines


def _docstring_lines(tree):
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def sizes(source):
    """`(name, kind, code lines)` of every function and class in `source`."""
    tree = ast.parse(source)
    counted = _code_lines(source) - _docstring_lines(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            kind = "class" if isinstance(node, ast.ClassDef) else "function"
            out.append((node.name, kind, len(counted & set(range(node.lineno, node.end_lineno + 1)))))
    return out


def test_the_package_imports_without_a_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert len(graph) > 50 and graph["gradmon.summary.judgement"], "the graph was read"
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_function_or_class_is_too_long():
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        for name, kind, lines in sizes(path.read_text()):
            if lines > (MAX_CLASS if kind == "class" else MAX_FUNCTION):
                too_long.append(f"{path.relative_to(ROOT.parent)}: {kind} {name} has {lines} code lines")
    assert not too_long, "\n".join(too_long)


def test_the_count_leaves_out_docstrings_comments_and_blank_lines():
    source = '''
class A:
    """A docstring
    over two lines."""

    # a comment
    def f(self):
        """One line."""
        x = (1 +
             2)
        return x
'''
    assert sorted(sizes(source)) == [("A", "class", 5), ("f", "function", 4)]
