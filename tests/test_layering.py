"""The architecture, kept by a test: imports point down only.

serve -> api -> engine -> contract <- backends -> model; ttnn_emu stands alone. Parsed from the
source (every `import` / `from ... import`, also inside functions and TYPE_CHECKING blocks), so an
upward import anywhere fails here, not in a reader's head.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "llm"

# layer -> the layers it may import (besides itself)
ALLOWED = {
    "llm.model": set(),
    "llm.engine.contract": {"llm.model"},
    "llm.engine": {"llm.engine.contract", "llm.model"},
    "llm.backends.torch": {"llm.engine.contract", "llm.model"},
    "llm.backends.tt": {"llm.engine.contract", "llm.model", "llm.ttnn_emu"},
    "llm.api": {"llm.engine", "llm.engine.contract", "llm.model"},
    "llm.serve": {"llm.api", "llm.engine", "llm.engine.contract", "llm.model", "llm"},
    "llm.ttnn_emu": set(),
    "llm": {"llm.api", "llm.engine", "llm.engine.contract", "llm.model"},
}


def layer_of(module: str) -> str:
    """The most specific layer a dotted module name belongs to."""
    best = "llm"
    for layer in ALLOWED:
        if (module == layer or module.startswith(layer + ".")) and len(layer) > len(best):
            best = layer
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every llm.* module `path` imports (a `from pkg import name` counts pkg.name if it is a
    module, else pkg)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "llm"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "llm":
                continue
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or (
                    ROOT.parent / sub.replace(".", "/")).is_dir()
                found.add(sub if is_module else node.module)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in ROOT.rglob("*.py")}


def test_imports_point_down_only() -> None:
    bad = []
    for mod, deps in graph().items():
        own = layer_of(mod)
        for dep in deps:
            target = layer_of(dep)
            if target != own and target not in ALLOWED[own]:
                bad.append(f"{mod} ({own}) imports {dep} ({target})")
    assert not bad, "upward or sideways imports:\n  " + "\n  ".join(sorted(bad))


def test_the_backends_do_not_import_each_other() -> None:
    g = graph()
    for a, b in (("llm.backends.torch", "llm.backends.tt"), ("llm.backends.tt",
                                                              "llm.backends.torch")):
        assert not [m for m, deps in g.items() if m.startswith(a)
                    and any(d.startswith(b) for d in deps)]


def test_no_import_cycles_outside_the_emulator() -> None:
    full = graph()
    g = {m: {d for d in deps if d in full} for m, deps in full.items()
         if not m.startswith("llm.ttnn_emu")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in g.get(node, ()):
            if dep.startswith("llm.ttnn_emu") or dep == node:
                continue
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_the_layering_check_sees_a_planted_violation() -> None:
    """The check is not blind: an engine module importing a backend is reported."""
    planted = ROOT / "engine" / "_planted_violation.py"
    planted.write_text("def f():\n    from llm.backends.torch.runner import TorchBackend\n")
    try:
        with pytest.raises(AssertionError, match="_planted_violation.*llm.backends.torch"):
            test_imports_point_down_only()
    finally:
        planted.unlink()


@pytest.mark.parametrize("module", ["llm", "llm.api.llm", "llm.serve.protocol",
                                    "llm.engine.core", "llm.engine.async_engine"])
def test_api_engine_and_protocol_import_no_torch_and_no_backend(module: str) -> None:
    code = (f"import sys, {module}; bad = [m for m in ('torch', 'triton', 'ttnn', "
            "'llm.backends', 'llm.ttnn_emu') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT.parent, check=True).stdout.strip()
    assert out == "[]", f"importing {module} imported {out}"
