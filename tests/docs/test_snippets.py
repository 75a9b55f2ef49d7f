"""Every ```python block of README.md and docs/*.md runs, and every relative link there resolves.

Each block is executed on its own, in a fresh namespace, from a temporary working directory (a snippet
may write files). The device is the suite's (``tests/conftest.py``: CUDA when present, else the CPU with
the Triton interpreter on); snippets pick theirs with ``"cuda" if torch.cuda.is_available() else "cpu"``
and keep their sizes small, so that the whole file runs in seconds on a CPU.

A snippet that needs something a plain checkout may lack says so in an HTML comment on the line(s)
directly above its opening fence; the test then skips it, with the reason, only when that is missing:

* ``<!-- snippet: requires-cuda -->`` — a CUDA device;
* ``<!-- snippet: requires transformers -->`` — an importable module (any name; several may follow);
* ``<!-- snippet: skip REASON -->`` — never run (a shell transcript written as Python, say).

Any other ``snippet:`` comment fails the test, so that a typo cannot silently skip a block.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_DIRECTIVE = re.compile(r"^\s*<!--\s*snippet:\s*(.*?)\s*-->\s*$")


@dataclass
class Snippet:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    directives: list[str]

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract(path: Path) -> list[Snippet]:
    """The ```python blocks of a markdown file, each with the ``snippet:`` directives right above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    snippets, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        start, body, i = i, [], i + 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence
        if lang.lower() not in ("python", "py"):
            continue
        directives, j = [], start - 1
        while j >= 0 and (d := _DIRECTIVE.match(lines[j])):
            directives.insert(0, d.group(1))
            j -= 1
        snippets.append(Snippet(path, start + 1, "\n".join(body) + "\n", directives))
    return snippets


SNIPPETS = [s for f in FILES for s in extract(f)]


def _missing(directives: list[str]) -> str | None:
    """Why the snippet cannot run here (None: it can); ValueError on an unknown directive."""
    for d in directives:
        word, _, rest = d.partition(" ")
        if word == "requires-cuda":
            if not torch.cuda.is_available():
                return "needs a CUDA device"
        elif word == "requires":
            for module in rest.split():
                if importlib.util.find_spec(module) is None:
                    return f"needs the optional package {module!r} (not installed)"
        elif word == "skip":
            return rest or "marked skip"
        else:
            raise ValueError(f"unknown snippet directive {d!r} (known: requires-cuda, requires MODULE..., skip REASON)")
    return None


def test_snippets_found():
    assert (ROOT / "docs").is_dir()
    assert any(s.path.name == "README.md" for s in SNIPPETS), "README.md has no python snippet"
    assert len(SNIPPETS) >= len(FILES) // 2


def test_extract_reads_directives(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text\n\n<!-- snippet: requires-cuda -->\n<!-- snippet: requires json -->\n```python\nx = 1\n```\n"
                  "```bash\nls\n```\n\n```python\ny = 2\n```\n", encoding="utf-8")
    a, b = extract(md)
    assert (a.line, a.code, a.directives) == (5, "x = 1\n", ["requires-cuda", "requires json"])
    assert (b.line, b.code, b.directives) == (12, "y = 2\n", [])
    with pytest.raises(ValueError, match="unknown snippet directive"):
        _missing(["requires_cuda"])


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, tmp_path, monkeypatch):
    reason = _missing(snippet.directives)
    if reason:
        pytest.skip(f"{snippet.name}: {reason}")
    monkeypatch.chdir(tmp_path)
    # compiled as the markdown file itself, the code at its own lines: tracebacks point into the file
    code = compile("\n" * snippet.line + snippet.code, str(snippet.path), "exec")
    exec(code, {"__name__": "__snippet__"})


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors of a markdown file (lower case, punctuation dropped, spaces to hyphens)."""
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"^#{1,6}\s+(.*?)\s*$", line):
            out.add(re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-"))
    return out


@pytest.mark.parametrize("path", FILES, ids=[str(f.relative_to(ROOT)) for f in FILES])
def test_links_resolve(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # not inside code blocks
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"
