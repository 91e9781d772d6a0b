"""No import circles among cultengine's modules, counting every import statement: at module level, inside
functions (a lazy import still ties the two modules together) and under `TYPE_CHECKING`. Read from the
source with `ast`, so a circle fails here whether or not the import happens to run.

The same check from the command line: `python tests/test_layering.py` prints each circle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "python" / "cultengine"


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The cultengine modules `name` imports. `from . import x` names module `x` when there is one (an
    extension such as `_core` is none: it imports no Python module of the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    found.add(f"{source}.{alias.name}")
                elif node.module and source in known:
                    found.add(source)
    found.discard(name)
    return found


def circles(root: Path = PACKAGE) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    known = modules(root)
    graph = {m: sorted(imports(m, p, known)) for m, p in known.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    assert circles() == []


def test_the_check_sees_a_circle(tmp_path):
    pkg = tmp_path / "cultengine"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n")
    (pkg / "c.py").write_text("from . import _core, a\n")
    assert circles(pkg) == [["cultengine.a", "cultengine.sub.b"]]


def test_core_modules_do_not_import_the_benchmark_layer():
    """bench/ sits on the engine: below it, nothing may reach up into it (but the demo checkpoint, which the
    engine builds on request for `Engine("demo")`)."""
    known = modules()
    core = [m for m in known if not m.startswith(("cultengine.bench", "cultengine.studies", "cultengine.serve"))]
    reaching_up = {
        m: sorted(d for d in imports(m, known[m], known) if d.startswith("cultengine.bench"))
        for m in core
        if m not in ("cultengine.cli", "cultengine.compare", "cultengine.profile")
    }
    assert {m: d for m, d in reaching_up.items() if d} == {"cultengine.engine": ["cultengine.bench.demo_checkpoint"]}


if __name__ == "__main__":
    for group in circles():
        print(" <-> ".join(group))
    print(f"{len(circles())} import circles")


def test_the_server_uses_only_the_engines_public_step_api():
    """`serve/` drives the engine through `prepare`, `add_request`, `add_scoring`, `step`, `release`, `abort`
    and `take_top_logprobs`: no `engine._x` (or `eng._x`) anywhere in it."""
    private = []
    for path in sorted((PACKAGE / "serve").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                if name in ("engine", "eng"):
                    private.append(f"{path.name}:{node.lineno}: {name}.{node.attr}")
    assert private == []


FAMILY_WORDS = (
    "onevision",
    "qwen",
    "gemma",
    "llava",
    "idefics",
    "internvl",
    "smolvlm",
    "mistral",
    "llama",
    "deepstack",
)


def _code_words(path: Path) -> list[str]:
    """Names, attributes and string constants of a module's code, docstrings and comments left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append(node.id)
        elif isinstance(node, ast.Attribute):
            words.append(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append(node.value)
    return words


def test_no_family_names_or_flags_outside_the_models():
    """The engine core reads what a family needs from its `Capabilities` and hooks: no family's name appears
    in the code of the engine, request preparation, runner, primitives, attention layout or kernels."""
    core = ["engine.py", "prepare.py", "runner.py", "ops.py", "attention_metadata.py", "sampling.py"]
    paths = [PACKAGE / name for name in core] + sorted((PACKAGE / "kernels").glob("*.py"))
    found = [
        f"{path.name}: {word!r}"
        for path in paths
        for word in _code_words(path)
        if any(f in word.lower() for f in FAMILY_WORDS)
    ]
    assert found == []


def test_capabilities_are_checked():
    import pytest

    from cultengine.models import Capabilities

    with pytest.raises(ValueError, match="must be atomic"):
        Capabilities(bidirectional_images=True)
    with pytest.raises(ValueError, match="position_rows"):
        Capabilities(position_rows=2)
