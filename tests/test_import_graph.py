"""The gradient side's import graph has no cycle (imports inside functions included).

Read from the source (`ast`), nothing imported: each `import gradmon...` /
`from gradmon... import ...` statement of a module, wherever it stands, is an
edge to the deepest gradmon module it names.
"""

import ast
import pathlib

import gradmon

ROOT = pathlib.Path(gradmon.__file__).parent
# the gradient side: measuring, publishing and the Keras glue between them
SIDE = ("gradmon.measure", "gradmon.publish", "gradmon.monitored", "gradmon.saving", "gradmon.tags",
        "gradmon.backend", "gradmon._validation")


def _modules():
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("gradmon",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name, path, modules):
    """The gradmon modules `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                kept = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(kept + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target not in (name, "gradmon"):
                found.add(target)
    return found


def _cycle(graph):
    """One cycle of `graph` as a list of modules, or `None` (depth-first search)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == "open":
                return path[path.index(other):] + [other]
            if other not in state:
                found = visit(other)
                if found:
                    return found
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _on_side(name):
    return any(name == s or name.startswith(s + ".") for s in SIDE)


def test_the_gradient_side_imports_without_a_cycle():
    modules = _modules()
    graph = {name: {m for m in _imports(name, path, modules) if _on_side(m)}
             for name, path in modules.items() if _on_side(name)}
    assert graph["gradmon.monitored"], "the graph was read (monitored imports the measuring side)"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    # the check itself can fail: a two-module cycle, as callbacks <-> monitored was
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_measuring_side_knows_of_publishing_only_the_schedule_and_its_host():
    """The device side (`gradmon.measure`) imports of the publishing side only the schedule's
    rule (the recorder applies it), the observer's host side (`Publisher`, behind the handle
    users hold) and, in `observe(log_dir=...)`, the writer it opens: never the callbacks,
    the policy watch or the layout."""
    modules = _modules()
    used = set()
    for name, path in modules.items():
        if name.startswith("gradmon.measure"):
            used |= {m for m in _imports(name, path, modules) if m.startswith("gradmon.publish.")}
    assert used == {"gradmon.publish.schedule", "gradmon.publish.publisher", "gradmon.publish.writer"}
    # and the schedule itself imports nothing of gradmon
    assert _imports("gradmon.publish.schedule", modules["gradmon.publish.schedule"], modules) == set()
