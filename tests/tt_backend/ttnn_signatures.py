"""The ttnn calls of llm/backends/tt, read from the source, and the signatures they must bind to.

Imports no torch, so the real wheel's half can run in an interpreter that has only ttnn.

A call is found by its callee: an attribute chain through a name `ttnn` (`ttnn.linear(...)`,
`self.mesh.ttnn.rms_norm(...)`, `ttnn.transformer.scaled_dot_product_attention(...)`); the part
after `ttnn` is its name. What is checked is the shape of the call: how many positional
arguments and which keywords. A call forwarding `**kwargs` is checked where its caller's keywords
are known (WRAPPERS).
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BACKEND = ROOT / "llm" / "backends" / "tt"
EMULATOR_INIT = ROOT / "llm" / "ttnn_emu" / "__init__.py"
SNAPSHOT = Path(__file__).with_name("ttnn_0_81_1_signatures.json")

# called on real ttnn only (device discovery in device.py), so not checked against the emulator
REAL_ONLY = frozenset({"get_num_devices"})
# compared loosely (keywords and positional count only, by unknown_keywords): the emulator
# merges these overloads into one signature, and open_device's hand-written nanobind signature
# leaves out the defaults its docstring states
LOOSE = {"interleaved_to_sharded": "overloads merged", "reshape": "overloads merged",
         "typecast": "overloads merged", "open_device": "defaults not in the signature"}

# backend helpers that forward to one ttnn op: name -> (op, positional args dropped in front,
# positional args kept after those, as the op's leading positionals)
WRAPPERS = {"linear_in_chunks": ("linear", 1, 2)}


@dataclass(frozen=True)
class Call:
    """One call site: `ttnn.<name>(<npos> positionals, <keywords>)` at `where`."""

    name: str
    npos: int
    keywords: tuple[str, ...]
    where: str


def _ttnn_name(func: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    parts.reverse()
    if "ttnn" in parts[:-1]:
        return ".".join(parts[parts.index("ttnn") + 1:])
    return None


def calls_in(root: Path = BACKEND) -> list[Call]:
    """Every ttnn call and constructor in the .py files under `root` (wrapped calls included)."""
    out: list[Call] = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.name}:{node.lineno}"
            keywords = tuple(k.arg for k in node.keywords if k.arg is not None)
            forwards = any(k.arg is None for k in node.keywords)
            name = _ttnn_name(node.func)
            if name is not None and any(isinstance(a, ast.Starred) for a in node.args):
                raise ValueError(f"{where}: ttnn.{name}(*...) cannot be checked")
            if name is not None and not forwards:
                out.append(Call(name, len(node.args), keywords, where))
            elif isinstance(node.func, ast.Name) and node.func.id in WRAPPERS:
                op, drop, keep = WRAPPERS[node.func.id]
                npos = len(node.args[drop:drop + keep])
                out.append(Call(op, npos, keywords, where))
            elif name is not None and forwards and _enclosing_wrapper(path, node) is None:
                raise ValueError(f"{where}: ttnn.{name}(**...) outside a known wrapper")
    return out


def _enclosing_wrapper(path: Path, call: ast.Call) -> str | None:
    for fn in ast.walk(ast.parse(path.read_text())):
        if isinstance(fn, ast.FunctionDef) and fn.name in WRAPPERS:
            if fn.lineno <= call.lineno <= (fn.end_lineno or fn.lineno):
                return fn.name
    return None


def resolve(module: Any, name: str) -> Any:
    """`module.a.b` for name "a.b" (a dict such as the recording: its entry, or AttributeError)."""
    if isinstance(module, dict):
        if name not in module:
            raise AttributeError(name)
        return module[name]
    obj = module
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _split_top(text: str) -> list[str]:
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def parse_nb_signature(text: str, drop_self: bool) -> inspect.Signature:
    """A nanobind `def f(a: T, /, b: U = \\0, *, c: V) -> R` line as an inspect.Signature (only
    names, kinds and whether a default exists)."""
    inner = text[text.index("(") + 1:text.rindex(")")]
    params, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for item in _split_top(inner):
        item = item.lstrip("\\")  # hand-written nanobind signatures escape "*" as "\*"
        if item == "/":
            params = [p.replace(kind=inspect.Parameter.POSITIONAL_ONLY) for p in params]
        elif item == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
        elif item.startswith("**"):
            params.append(inspect.Parameter(item[2:].split(":")[0], inspect.Parameter.VAR_KEYWORD))
        elif item.startswith("*"):
            params.append(inspect.Parameter(item[1:].split(":")[0],
                                            inspect.Parameter.VAR_POSITIONAL))
            kind = inspect.Parameter.KEYWORD_ONLY
        else:
            name = item.split(":")[0].split("=")[0].strip()
            default = None if " = " in item else inspect.Parameter.empty
            params.append(inspect.Parameter(name, kind, default=default))
    if drop_self:
        params = params[1:]
    return inspect.Signature(params)


def real_signatures(obj: Any) -> list[inspect.Signature]:
    """The overloads of a real ttnn 0.81.1 callable: a registered operation (FastOperation: its
    nanobind function or `__call__`), a nanobind class (its `__init__`), a nanobind function, or a
    Python function."""
    if hasattr(obj, "function") and hasattr(obj, "python_fully_qualified_name"):
        obj = obj.function
    nb = getattr(obj, "__nb_signature__", None)
    drop_self = False
    if nb is None and isinstance(obj, type):
        nb, drop_self = getattr(obj.__init__, "__nb_signature__", None), True
    if nb is None and not inspect.isroutine(obj) and not isinstance(obj, type):
        nb, drop_self = getattr(type(obj).__call__, "__nb_signature__", None), True
    if nb is None:
        return [inspect.signature(obj)]
    return [parse_nb_signature(overload[0], drop_self) for overload in nb]


def to_json(sigs: list[inspect.Signature]) -> list[list[list]]:
    """Signatures as [[name, kind, has_default], ...] per overload (the snapshot's format)."""
    return [[[p.name, p.kind.name, p.default is not inspect.Parameter.empty]
             for p in sig.parameters.values()] for sig in sigs]


def from_json(overloads: list[list[list]]) -> list[inspect.Signature]:
    """The inverse of to_json."""
    return [inspect.Signature([inspect.Parameter(
        name, getattr(inspect.Parameter, kind),
        default=None if has_default else inspect.Parameter.empty)
        for name, kind, has_default in ov]) for ov in overloads]


def snapshot_names() -> list[str]:
    """The names recorded: every ttnn name the backend calls and every name the emulator exports
    (its `__all__`, read from the source), where real ttnn has a signature for it."""
    tree = ast.parse(EMULATOR_INIT.read_text())
    exported: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                for t in node.targets):
            exported = [ast.literal_eval(e) for e in node.value.elts]
    return sorted({c.name for c in calls_in()} | set(exported))


def record(ttnn: Any) -> dict[str, list[list[list]]]:
    """Real ttnn's signatures of snapshot_names() (enums, types without a signature left out)."""
    import enum
    out = {}
    for name in snapshot_names():
        try:
            obj = resolve(ttnn, name)
            if isinstance(obj, type) and issubclass(obj, enum.Enum):
                continue
            out[name] = to_json(real_signatures(obj))
        except (AttributeError, ValueError, TypeError):
            continue  # absent from ttnn, a constant, or a type without an __init__ signature
    return out


def looser(emu_sig: inspect.Signature, overloads: list[inspect.Signature]) -> list[str]:
    """Where the emulator accepts a call shape that real ttnn refuses, judged against the real
    overload it matches best: a keyword real ttnn lacks or takes positionally only, more
    positionals, a required argument that the emulator defaults, a positional-only argument
    the emulator also takes by name. Empty when it is as strict as one overload."""
    P = inspect.Parameter
    best: list[str] | None = None
    for real in overloads:
        rp = real.parameters
        var_kw = any(p.kind == P.VAR_KEYWORD for p in rp.values())
        var_pos = any(p.kind == P.VAR_POSITIONAL for p in rp.values())
        positional = [p for p in rp.values() if p.kind in (P.POSITIONAL_ONLY,
                                                           P.POSITIONAL_OR_KEYWORD)]
        problems = []
        emu_positional = [p for p in emu_sig.parameters.values()
                          if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
        if len(emu_positional) > len(positional) and not var_pos:
            problems.append(f"takes {len(emu_positional)} positionals, real {len(positional)}")
        for i, p in enumerate(emu_positional):
            if i < len(positional) and positional[i].kind == P.POSITIONAL_ONLY and \
                    p.kind != P.POSITIONAL_ONLY:
                problems.append(f"{p.name} is positional-only in real ttnn")
        for p in emu_sig.parameters.values():
            if p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD):
                problems.append(f"accepts {p}")
            elif p.kind != P.POSITIONAL_ONLY and not var_kw and (
                    p.name not in rp or rp[p.name].kind == P.POSITIONAL_ONLY):
                problems.append(f"takes {p.name}= which real ttnn does not")
        for p in rp.values():
            if (p.default is P.empty and p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)
                    and p.name in emu_sig.parameters
                    and emu_sig.parameters[p.name].default is not P.empty):
                problems.append(f"{p.name} is required in real ttnn, defaulted here")
        if best is None or len(problems) < len(best):
            best = problems
    return best or []


def unknown_keywords(emu_sig: inspect.Signature,
                     overloads: list[inspect.Signature]) -> list[str]:
    """The looser check: keywords the emulator takes that no real overload takes by name, and
    more positionals than any overload takes."""
    P = inspect.Parameter
    by_name = {p.name for sig in overloads for p in sig.parameters.values()
               if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)}
    most = max(sum(p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
                   for p in sig.parameters.values()) for sig in overloads)
    emu = list(emu_sig.parameters.values())
    problems = [f"takes {p.name}= which no real overload does" for p in emu
                if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and p.name not in by_name]
    problems += [f"accepts {p}" for p in emu if p.kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD)]
    npos = sum(p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) for p in emu)
    if npos > most:
        problems.append(f"takes {npos} positionals, real at most {most}")
    return problems


def binds(sigs: list[inspect.Signature], call: Call) -> str | None:
    """None when one overload accepts the call's shape, else why the first one does not."""
    errors = []
    for sig in sigs:
        try:
            sig.bind(*([None] * call.npos), **dict.fromkeys(call.keywords))
            return None
        except TypeError as e:
            errors.append(f"{e} (signature {sig})")
    return f"{call.where}: ttnn.{call.name}: {errors[0]}"


def mismatches(module: Any, signatures_of, calls: list[Call]) -> list[str]:
    """Every call of `calls` that no signature of its `module` callable accepts."""
    out = []
    for call in calls:
        try:
            obj = resolve(module, call.name)
        except AttributeError:
            out.append(f"{call.where}: ttnn.{call.name} does not exist")
            continue
        why = binds(signatures_of(obj), call)
        if why:
            out.append(why)
    return out


if __name__ == "__main__":  # rewrite the snapshot from the installed wheel (see SNAPSHOT's test)
    import json

    import ttnn as _ttnn

    rows = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(record(_ttnn).items())]
    SNAPSHOT.write_text("{\n" + ",\n".join(rows) + "\n}\n")
    print(f"wrote {SNAPSHOT}")
