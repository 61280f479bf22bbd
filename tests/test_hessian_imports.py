"""The Hessian side imports nothing of the gradient side, and no TensorFlow off TensorFlow.

Read from the source (`ast`, imports inside functions included), with the reader of
`test_import_graph`: everything `gradmon.hessian` reaches, transitively, is the Hessian
side, the backend layer, tags, validation and the writer (with its record file and
the chart primitives), never `gradmon.measure`, the callbacks, the layout of the
gradient charts, `monitored` or `saving`.
"""

from test_import_graph import _imports, _modules

GRADIENT_SIDE = ("gradmon.measure", "gradmon.publish.callbacks", "gradmon.publish.layout",
                 "gradmon.publish.policy", "gradmon.publish.publisher", "gradmon.monitored",
                 "gradmon.saving")


def _reached(start, modules):
    """Every gradmon module `start` imports, transitively."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += sorted(_imports(name, modules[name], modules))
    return seen


def test_the_hessian_side_reaches_nothing_of_the_gradient_side():
    modules = _modules()
    reached = set()
    for name in modules:
        if name.startswith("gradmon.hessian"):
            reached |= _reached(name, modules)
    assert "gradmon.publish.writer" in reached and "gradmon.backend.hvp" in reached  # it was read
    crossing = sorted(m for m in reached if any(m == g or m.startswith(g + ".") for g in GRADIENT_SIDE))
    assert crossing == []


def test_only_the_tensorflow_backend_module_imports_tensorflow_at_the_top():
    """`gradmon.backend.hvp` picks its framework module at run time; the Hessian modules and
    the other backends' modules do not import TensorFlow when they are imported."""
    import ast
    import pathlib

    import gradmon

    root = pathlib.Path(gradmon.__file__).parent
    paths = sorted(root.glob("hessian/*.py")) + sorted(root.glob("backend/hvp*.py")) + [
        root / "backend" / "keras_compat.py", root / "backend" / "host.py", root / "publish" / "writer.py",
        root / "publish" / "charts.py"]
    at_top = []
    for path in paths:
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "tensorflow" or n.startswith("tensorflow.") for n in names):
                at_top.append(path.relative_to(root).as_posix())
    assert at_top == ["backend/hvp_tensorflow.py"]
