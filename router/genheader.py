"""Write router/fastlane_protocol.h, the C core's copy of router/protocol.py's constants.

The header is generated, never edited: setup.py's build_ext runs this before compiling
router/fastlane.c (so ``pip install -e .`` and ``setup.py build_ext --inplace`` both do),
and ``python -m router.genheader`` does it by hand (scripts/asan_router.sh). It is not
committed: a committed copy could go stale, while a generated one cannot, and the
library already is a build output. A library built from other values is refused at load
time, because the header carries a digest of the values that fastlane_load.py recomputes
from the module it imports.

It reads protocol.py with ``ast`` instead of importing it: pip builds the package in an
environment without msgpack, which protocol.py imports.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import os
import sys
from collections.abc import Callable, Mapping

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "protocol.py")
HEADER = os.path.join(HERE, "fastlane_protocol.h")

Value = int | bytes | tuple[tuple[str, str], ...]

_BINOPS: dict[type[ast.operator], Callable[[int, int], int]] = {
    ast.LShift: operator.lshift,
    ast.Mult: operator.mul,
    ast.Add: operator.add,
    ast.Sub: operator.sub,
}
_C_TYPES = {"int": "int", "double": "double"}


def _evaluate(node: ast.expr, known: Mapping[str, object]) -> object:
    """Literals, tuples, names defined earlier and integer arithmetic; nothing else."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(_evaluate(e, known) for e in node.elts)
    if isinstance(node, ast.Name) and node.id in known:
        return known[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _evaluate(node.operand, known)
        if isinstance(value, int):
            return -value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _evaluate(node.left, known), _evaluate(node.right, known)
        if isinstance(left, int) and isinstance(right, int):
            return _BINOPS[type(node.op)](left, right)
    raise ValueError(f"protocol.py line {node.lineno}: not a constant the C header can hold")


def read_constants(path: str = SOURCE) -> dict[str, Value]:
    """The values of the names protocol.py lists in C_EXPORTS, read without importing it."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    known: dict[str, object] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value:
            try:
                known[stmt.target.id] = _evaluate(stmt.value, known)
            except ValueError:
                continue  # not for C (a frozenset, a dict): fine unless C_EXPORTS names it
    exports = known.get("C_EXPORTS")
    if not isinstance(exports, tuple):
        raise ValueError(f"{path}: no C_EXPORTS tuple")
    missing = [name for name in exports if name not in known]
    if missing:
        raise ValueError(f"{path}: C_EXPORTS names {missing}, which are not literal constants")
    return {name: known[name] for name in exports}  # type: ignore[misc]


def digest(values: Mapping[str, object]) -> int:
    """A 63-bit digest of the exported values (a C int64 and a Python int alike)."""
    text = repr(sorted(values.items())).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def _c_string(raw: bytes) -> str:
    chars = (chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in raw)
    return '"' + "".join(chars) + '"'


def render(values: Mapping[str, Value]) -> str:
    lines = [
        "/* Generated from router/protocol.py by router/genheader.py: do not edit. */",
        "#ifndef FASTLANE_PROTOCOL_H",
        "#define FASTLANE_PROTOCOL_H",
        "",
    ]
    for name, value in values.items():
        if name == "REQ_INFO_FIELDS":
            continue
        if isinstance(value, bytes):
            lines.append(f"#define {name} {_c_string(value)}")
            lines.append(f"#define {name}_LEN {len(value)}")
        elif isinstance(value, int) and not isinstance(value, bool):
            lines.append(f"#define {name} ({value})" if value < 0 else f"#define {name} {value}")
        else:
            raise ValueError(f"{name}: a {type(value).__name__} has no C form")
    fields = values.get("REQ_INFO_FIELDS", ())
    if isinstance(fields, tuple) and fields:
        lines += ["", "/* What fl_info and fl_fail tell Python about a request. */"]
        lines.append("typedef struct {")
        for field, ctype in fields:
            lines.append(f"    {_C_TYPES[ctype]} {field};")
        lines.append("} req_info_t;")
    lines += ["", f"#define FL_PROTOCOL_DIGEST {digest(values)}LL", "", "#endif", ""]
    return "\n".join(lines)


def write_header(path: str = HEADER, source: str = SOURCE) -> bool:
    """Write the header if its text changed (so make-style rebuilds stay quiet)."""
    text = render(read_constants(source))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, path)
    return True


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else HEADER
    write_header(out)
    print(out)
