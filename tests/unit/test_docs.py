"""Links between the manual's pages, and the code's references to them, resolve.

A link is ``[text](path)``, ``[text](path#anchor)`` or ``[text](#anchor)``; an anchor is
a heading as GitHub names it (lower case, spaces to '-', punctuation dropped, ``-1``,
``-2``... for repeats). The code refers to the manual as ``docs/<page>.md#<anchor>`` (or
``README.md#<anchor>``), so a renamed heading or page fails here instead of leaving a
reference to nothing.
"""

import re

import pytest

from support.processes import REPO_ROOT

DOCS = REPO_ROOT / "docs"
PAGES = [REPO_ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((REPO_ROOT / "bench").glob("*.md"))]
# Where code and its comments live; each file's references to the manual are checked.
CODE_DIRS = ("chatgateway", "tests", "bench", "deploy", "twisted", "proto")
CODE_SUFFIXES = {".py", ".md", ".yml", ".yaml", ".c", ".proto", ".txt"}
CODE_FILES = ("Makefile", "Dockerfile", "setup.py")

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`[^`]*`")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# docs/<page>.md or the top README.md (not bench/README.md), with an optional #anchor.
MANUAL_REFERENCE = re.compile(r"(?<![\w/.])((?:\.\./)*(?:docs/[\w.-]+\.md|README\.md))(#[\w-]+)?")
# The document these pages replaced, which is not in the repository.
RETIRED = "DESIGN" + " §"
# Informal section references that no test can check: the README's name, then a comma
# or a quote, then a section's title.
INFORMAL = re.compile(r'\bREADME(?:,\s*"?|\s+")[A-Z]')


def _prose_lines(path):
    """The lines of a Markdown file outside fenced code blocks."""
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            yield line


def github_anchor(title):
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    seen = {}
    names = set()
    for line in _prose_lines(path):
        match = HEADING.match(line)
        if match:
            base = github_anchor(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            names.add(base if count == 0 else f"{base}-{count}")
    return names


def links(path):
    for line in _prose_lines(path):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:...
                yield target


def unresolved(base, target):
    """Why ``target`` (relative to the directory ``base``) does not resolve, or None."""
    path, _, anchor = target.partition("#")
    resolved = (base / path).resolve() if path else None
    if resolved is not None and not resolved.exists():
        return f"{target}: no such file"
    if anchor and (resolved is None or resolved.suffix == ".md"):
        names = anchors(resolved) if resolved is not None else None
        if anchor not in names:
            return f"{target}: no heading #{anchor}"
    return None


def test_github_anchor():
    assert github_anchor("Frames from the device (`StreamRequest`)") == "frames-from-the-device-streamrequest"
    assert github_anchor("Stopping: the drain") == "stopping-the-drain"
    assert github_anchor("Redis cost of connection metadata — `bench/redis_cost.py`") == (
        "redis-cost-of-connection-metadata--benchredis_costpy"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_link_and_anchor_resolves(page):
    problems = []
    for target in links(page):
        if target.startswith("#"):
            if target[1:] not in anchors(page):
                problems.append(f"{target}: no heading in this page")
        else:
            problem = unresolved(page.parent, target)
            if problem:
                problems.append(problem)
    assert problems == []


def test_readme_links_every_docs_page():
    linked = {(REPO_ROOT / target.partition("#")[0]).resolve() for target in links(REPO_ROOT / "README.md")}
    assert [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked] == []


def _code_files():
    for name in CODE_DIRS:
        for path in sorted((REPO_ROOT / name).rglob("*")):
            parts = set(path.relative_to(REPO_ROOT).parts)
            if path.is_file() and path.suffix in CODE_SUFFIXES and not parts & {"__pycache__", "out"}:
                yield path
    for name in CODE_FILES:
        yield REPO_ROOT / name


def test_code_refers_only_to_pages_and_headings_that_exist():
    problems = []
    for path in _code_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        where = path.relative_to(REPO_ROOT)
        if RETIRED in text:
            problems.append(f"{where}: refers to {RETIRED}N, a document not in the repository")
        for match in INFORMAL.finditer(text):
            problems.append(f"{where}: {match.group(0)!r}...: name the page and heading (docs/<page>.md#<anchor>)")
        for page, anchor in MANUAL_REFERENCE.findall(text):
            problem = unresolved(REPO_ROOT, page.lstrip("./") + anchor)
            if problem:
                problems.append(f"{where}: {problem}")
    assert problems == []
