"""Every ```python block of README.md runs as it stands.

Each block is one test (id ``README.md:L<line of its fence>``, ``-timm`` appended when it imports
timm), run on its own in a fresh namespace
in a temporary working directory (files it writes, e.g. ``runs/...``, land there):

1. names check (instant): every name the block reads must be bound in the block (assigned,
   imported, defined, a loop/with/except target) or be a builtin. A snippet that relies on names
   from nowhere (``x2``, ``train_batches``) fails here, with all such names listed, before anything
   runs.
2. run: the block is executed; tracebacks point at README.md lines.

Convention: a block that is not meant to run (pseudo-code, an excerpt, a long job) is marked with
the HTML comment ``<!-- not-run -->`` on the last non-blank line before its opening fence; it is
then skipped (reported as skipped, with its line). Blocks of other languages (```bash) are never run.
A block that imports ``timm`` (an optional dependency) is skipped where timm is not installed,
except under ``TOPODERIV_REQUIRE_TIMM=1`` (CI's timm environment), where it must run.
"""
from __future__ import annotations

import ast
import builtins
import importlib.util
import os
import re
from pathlib import Path
from typing import List, NamedTuple, Set

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = "<!-- not-run -->"


class Block(NamedTuple):
    line: int  # 1-based line of the opening fence
    code: str
    not_run: bool


def python_blocks(text: str) -> List[Block]:
    """The ```python blocks of a markdown text (fences at the start of a line, any indentation)."""
    lines = text.splitlines()
    blocks: List[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(\s*)(```+|~~~+)\s*(\w*)", lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        if lang in ("python", "py"):
            prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            body = [ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1 : j]]
            blocks.append(Block(i + 1, "\n".join(body) + "\n", prev == NOT_RUN))
        i = j + 1
    return blocks


def unbound_names(code: str) -> Set[str]:
    """Names a block reads that it never binds and that are not builtins (scopes are merged: a
    name bound anywhere in the block counts as bound)."""
    tree = ast.parse(code)
    read: Set[str] = set()
    bound: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
    return read - bound - set(dir(builtins))


def imports_timm(code: str) -> bool:
    """Whether a block imports the optional dependency timm."""
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "timm" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "timm":
            return True
    return False


BLOCKS = python_blocks(README.read_text()) if README.is_file() else []


def test_the_readme_has_python_blocks():
    assert README.is_file(), f"{README} is missing"
    assert BLOCKS, "README.md has no ```python block: nothing would be checked"


def test_the_checks_can_fail():
    """The extraction and the names check on a small markdown text."""
    md = ("text\n```python\nimport torch\ny = torch.zeros(2) + x2\n```\n\n<!-- not-run -->\n\n```python\nfoo()\n```\n"
          "```bash\nls\n```\n    ```python\n    for i in range(2):\n        print(i)\n    ```\n")
    b = python_blocks(md)
    assert [(x.line, x.not_run) for x in b] == [(2, False), (9, True), (15, False)]
    assert unbound_names(b[0].code) == {"x2"} and unbound_names(b[1].code) == {"foo"}
    assert unbound_names(b[2].code) == set()
    assert unbound_names("def f(a, *b, **c):\n    return a, b, c, d\n[z for z in range(3)]\n") == {"d"}
    assert imports_timm("import torch, timm\n") and imports_timm("from timm.layers import Mlp\n")
    assert not imports_timm("import timmy\nfrom topoderiv.models import timm_model\n")


@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:L{b.line}" + ("-timm" if imports_timm(b.code) else "")
                                                for b in BLOCKS])
def test_readme_python_block_runs(block, tmp_path, monkeypatch):
    if block.not_run:
        pytest.skip(f"README.md line {block.line}: marked {NOT_RUN}")
    if imports_timm(block.code) and importlib.util.find_spec("timm") is None \
            and os.environ.get("TOPODERIV_REQUIRE_TIMM") != "1":
        pytest.skip(f"README.md line {block.line}: needs timm (pip install '.[timm]')")
    missing = unbound_names(block.code)
    assert not missing, (f"README.md block at line {block.line} uses names it never defines: "
                         f"{', '.join(sorted(missing))}")
    monkeypatch.chdir(tmp_path)
    code = compile("\n" * block.line + block.code, str(README), "exec")  # tracebacks name README.md lines
    exec(code, {"__name__": "__readme__"})
