"""The README and docs/ link only to what exists: every relative link names a file in the repository, and every
``#anchor`` names a heading of its target (GitHub's heading slugs). External (http) links are not fetched."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import REPO_ROOT

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def _pages() -> list[Path]:
    return [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")), REPO_ROOT / "infra" / "README.md"]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def test_slug_matches_github():
    assert slug("## The memory-free rivals of mac+rag@1".lstrip("# ")) == "the-memory-free-rivals-of-macrag1"
    assert slug("Serving with the slots checkpoint (2026-11-26)") == "serving-with-the-slots-checkpoint-2026-11-26"
    assert slug("Does the memory carry the document? (`macstream diagnose`)") == \
        "does-the-memory-carry-the-document-macstream-diagnose"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_links_resolve(page: Path):
    broken = []
    for m in LINK.finditer(FENCE.sub("", page.read_text())):
        target = m.group(1) or m.group(2)
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.relative_to(REPO_ROOT)}: " + "; ".join(broken)


CODE_SPAN = re.compile(r"`([^`\n]+)`")
FILE_EXT = re.compile(r"\.(py|md|ya?ml|json|jsonl|toml|txt|log|png|safetensors|sh|cfg|ini)$")
RESULT_PATH = re.compile(r"(?:benchmarks|research)/results/[^\s`)\]'\",;]*")


def layout_paths(text: str) -> list[str]:
    """Every repo path written in backticks on docs/layout.md, outside code fences. A span is a path when it holds a
    '/' or ends in a file extension, and has no placeholder (``<date>``, ``*``, ``$``, spaces). A bare name after a
    path in the same table cell or line (``pipeline/store/qdrant.py``, ``inmemory.py``) is in that path's folder."""
    out = []
    for line in FENCE.sub("", text).splitlines():
        for cell in line.split("|"):
            folder = ""
            for span in CODE_SPAN.findall(cell):
                if re.search(r"[<>*$ {}()\"'=]", span) or not ("/" in span or FILE_EXT.search(span)):
                    continue
                if "/" in span:
                    out.append(span)
                    folder = span if span.endswith("/") else span.rsplit("/", 1)[0] + "/"
                else:
                    out.append(folder + span)
    return out


def test_layout_paths_parse():
    cell = "`pipeline/store/qdrant.py`, `inmemory.py` and `docs/`, `x.py`; `MACSTREAM_HOME` `<date>/a.md` `f(x)`"
    assert layout_paths(f"| {cell} | `top.yml` |") == [
        "pipeline/store/qdrant.py", "pipeline/store/inmemory.py", "docs/", "docs/x.py", "top.yml"]
    assert layout_paths("```\n`in/a/fence.py`\n```\n") == []


def test_layout_paths_exist():
    """docs/layout.md names only modules and folders that exist: a module that moves or leaves must leave the page."""
    paths = layout_paths((REPO_ROOT / "docs" / "layout.md").read_text())
    assert len(paths) > 40, "docs/layout.md lists the modules in backticks"
    missing = [p for p in paths if not (REPO_ROOT / p).exists()]
    assert not missing, "docs/layout.md names paths that do not exist: " + ", ".join(missing)


def test_layout_lists_every_module():
    """Every tracked module of the product and the studies has a row on docs/layout.md (itself or its folder)."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    rows = [line.split("|")[1] for line in (REPO_ROOT / "docs" / "layout.md").read_text().splitlines()
            if line.startswith("|") and line.count("|") > 2]  # the table's path column; prose does not count
    named = set(layout_paths("\n".join(f"| {cell} |" for cell in rows)))
    folders = tuple(p for p in named if p.endswith("/"))
    unnamed = [f for f in tracked.stdout.split()
               if f.split("/")[0] in ("pipeline", "workers", "serving", "benchmarks", "macstream", "research")
               and not f.endswith("__init__.py") and f not in named and not f.startswith(folders)]
    assert not unnamed, "modules missing from docs/layout.md: " + ", ".join(unnamed)


def result_paths(text: str) -> list[str]:
    """``benchmarks/results/...`` and ``research/results/...`` paths cited in a page (also inside relative links
    such as ``../benchmarks/results/...``), trailing punctuation dropped; placeholders (``<date>``) skipped."""
    out = []
    for m in RESULT_PATH.finditer(text):
        path = m.group(0).rstrip(".:")
        if "<" not in path and "*" not in path:
            out.append(path)
    return out


def test_result_paths_parse():
    text = "see [a](../research/results/2026-11-29/x.md), `benchmarks/results/<date>/report.md` and " \
           "benchmarks/results/2026-11-29/. Also `research/results/2026-11-29/y.json`:"
    assert result_paths(text) == ["research/results/2026-11-29/x.md", "benchmarks/results/2026-11-29/",
                                  "research/results/2026-11-29/y.json"]


@pytest.mark.parametrize("page", [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))],
                         ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_cited_result_files_exist(page: Path):
    """A result file the README or docs/ cite by path exists there (result files moved to research/ once)."""
    missing = sorted({p for p in result_paths(page.read_text()) if not (REPO_ROOT / p).exists()})
    assert not missing, f"{page.relative_to(REPO_ROOT)} cites result paths that do not exist: " + ", ".join(missing)
