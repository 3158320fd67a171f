"""A griffe extension: render the reST bits of rtcore's docstrings as Markdown.

rtcore's docstrings are Google style (what mkdocstrings parses), but their
prose uses Sphinx roles (``:class:`~rtcore.Node```) and reST literal blocks
(``Example::`` then an indented block), which Markdown would show verbatim.
Rewriting hundreds of docstrings would touch every module; this rewrites
them as they are loaded, for the guide only:

* ``:role:`~a.b.C``` becomes ```C```, ``:role:`a.b.C``` becomes ```a.b.C```;
* a paragraph ending in ``::`` ends in ``:`` and the indented block after it
  becomes a fenced Python code block.
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj|const|term|ref):`(?P<target>[^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match["target"]
    if "<" in target and target.endswith(">"):  # :ref:`text <target>`
        return f"`{target[: target.index('<')].strip()}`"
    if target.startswith("~"):
        return f"`{target[1:].rsplit('.', 1)[-1]}`"
    return f"`{target}`"


def _literal_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::") and i + 1 < len(lines) and not lines[i + 1].strip():
            indent = len(line) - len(line.lstrip())
            # The block: the following lines indented deeper than the paragraph (blank lines included).
            j = i + 1
            block: list[str] = []
            while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
                block.append(lines[j])
                j += 1
            while block and not block[-1].strip():
                block.pop()
                j -= 1
            if block:
                head = line.rstrip()[:-2].rstrip()
                out.append(f"{head}:" if head else "")
                pad = " " * indent
                code = textwrap.dedent("\n".join(block).strip("\n"))
                out += ["", f"{pad}```python", *[f"{pad}{c}" if c else "" for c in code.splitlines()], f"{pad}```"]
                i = j
                continue
        out.append(line)
        i += 1
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite each docstring once the object tree is built."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _literal_blocks(ROLE.sub(_role, obj.docstring.value))
