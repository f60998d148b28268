"""The library stays readable: no function in `revdiffrax/` is longer than 80 code
lines (blank lines, comments and docstrings not counted)."""

import ast
import pathlib


MAX_CODE_LINES = 80
PACKAGE = pathlib.Path(__file__).parent.parent / "revdiffrax"


def _code_lines(source_lines: list[str], node: ast.AST) -> int:
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    docstring = range(0)
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        assert first.end_lineno is not None
        docstring = range(first.lineno, first.end_lineno + 1)
    assert node.end_lineno is not None
    count = 0
    for number in range(node.lineno, node.end_lineno + 1):
        text = source_lines[number - 1].strip()
        if number not in docstring and text and not text.startswith("#"):
            count += 1
    return count


def test_no_long_functions():
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(lines, node)
                if n > MAX_CODE_LINES:
                    too_long.append(f"{path.name}:{node.lineno} {node.name} ({n})")
    assert not too_long, too_long
