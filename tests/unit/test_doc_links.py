"""Every doc link resolves inside the repository (a fresh clone has nothing beside it).

Checked, by scanning the tree (no list of expected files):
- in README.md, docs/*.md and any *.md under the product folders: every relative markdown link
  `[text](target)` and every `*.md` path named in the text (outside fenced code), with its
  `#anchor` when it has one; in docs/, also every quoted path into the product folders
  (`rollout/april.py`), so the design cannot name code that is gone;
- in the comments and docstrings of the product folders (and pyproject.toml, the Makefile,
  recipes/): every `*.md` file they name, and the section when it is named as
  `FILE.md, "Section"` or `FILE.md#anchor`.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("algos", "bench", "kernels", "recipes", "rollout", "swarm", "tasks", "trainer")
ROOT_FILES = ("pyproject.toml", "Makefile")

LINK_RE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A *.md path, optionally with an anchor, optionally followed by a quoted section name.
MD_NAME_RE = re.compile(r"(?<![\w/.-])((?:\.{1,2}/)?[\w./-]*[\w-]\.md)(?:#([\w-]+))?(?![\w])"
                        r"(?:,?\s*\"([^\"\n]+)\")?")
# In docs/: a quoted path into the repository (`rollout/april.py`, `docs/`), which must exist.
CODE_PATH_RE = re.compile(r"`((?:%s|docs|tests)/[\w./-]*)`" % "|".join(PRODUCT))
HEADING_RE = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
FENCE_RE = re.compile(r"^\s*(```|~~~)")


def _outside_fences(text: str) -> str:
    """The text with fenced code blocks blanked (line count kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE_RE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def headings(path: Path) -> tuple[set[str], set[str]]:
    """(anchors, lower-cased heading texts) of a markdown file, duplicates numbered as GitHub does."""
    anchors, titles, seen = set(), set(), {}
    for line in _outside_fences(path.read_text(encoding="utf-8")).splitlines():
        match = HEADING_RE.match(line)
        if not match:
            continue
        title = match.group(2)
        titles.add(title.lower())
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        anchors.add(base if n == 0 else f"{base}-{n}")
    return anchors, titles


def _inside_repo(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def _resolve(name: str, source: Path, root: Path, from_root: bool) -> Path | None:
    """The existing in-repository file `name` refers to from `source`, or None."""
    bases = [source.parent] + ([root] if from_root else [])
    for base in bases:
        candidate = base / name
        if _inside_repo(candidate, root) and candidate.exists():
            return candidate.resolve()
    return None


def _check_section(target: Path, anchor: str | None, section: str | None) -> str | None:
    """Why the anchor or named section is missing from `target` (None: present or not asked)."""
    if target.suffix != ".md" or (anchor is None and section is None):
        return None
    anchors, titles = headings(target)
    if anchor is not None and anchor not in anchors:
        return f"no heading with anchor #{anchor}"
    if section is not None and section.lower() not in titles and slug(section) not in anchors:
        return f'no section "{section}"'
    return None


def _where(path: Path, root: Path, line: int) -> str:
    return f"{path.relative_to(root)}:{line}"


def check_markdown(path: Path, root: Path = ROOT) -> list[str]:
    """Broken relative links and *.md names in one markdown file."""
    problems = []
    text = _outside_fences(path.read_text(encoding="utf-8"))
    names_text = text
    for match in LINK_RE.finditer(text):
        target = match.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto: ...
        name, _, anchor = target.partition("#")
        where = _where(path, root, text.count("\n", 0, match.start()) + 1)
        resolved = path.resolve() if not name else _resolve(name, path, root, from_root=False)
        if resolved is None:
            problems.append(f"{where}: link to {target}: no such file in the repository")
            continue
        why = _check_section(resolved, anchor or None, None)
        if why:
            problems.append(f"{where}: link to {target}: {why}")
    if path.parent.name == "docs":  # the design names code: each path it quotes must exist
        for match in CODE_PATH_RE.finditer(text):
            if not (root / match.group(1)).exists():
                where = _where(path, root, text.count("\n", 0, match.start()) + 1)
                problems.append(f"{where}: quotes {match.group(1)}: no such path in the repository")
    # Names outside links (`docs/X.md`, "see X.md"); the links were checked above.
    names_text = LINK_RE.sub(lambda m: " " * len(m.group(0)), names_text)
    return problems + _check_md_names(path, names_text, root, line=1)


def _check_md_names(path: Path, text: str, root: Path, line: int) -> list[str]:
    """Broken `*.md` names in `text`, a piece of `path` that starts at line `line`."""
    problems = []
    for match in MD_NAME_RE.finditer(text):
        name, anchor, section = match.groups()
        where = _where(path, root, line + text.count("\n", 0, match.start()))
        resolved = _resolve(name, path, root, from_root=True)
        if resolved is None:
            problems.append(f"{where}: names {name}: no such file in the repository")
            continue
        why = _check_section(resolved, anchor, section)
        if why:
            problems.append(f"{where}: names {name}: {why}")
    return problems


def python_doc_text(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring in a Python file."""
    source = path.read_text(encoding="utf-8")
    found = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found.append((token.start[0], token.string))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.append((body[0].lineno, body[0].value.value))
    return sorted(found)


def hash_comments(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every `#` comment in a YAML / TOML / Makefile (whole-line or trailing)."""
    found = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        at = line.find("#")
        if at >= 0:
            found.append((number, line[at:]))
    return found


def check_code_file(path: Path, root: Path = ROOT) -> list[str]:
    """Broken *.md names in one source file's comments and docstrings."""
    pieces = python_doc_text(path) if path.suffix == ".py" else hash_comments(path)
    return [p for line, text in pieces for p in _check_md_names(path, text, root, line)]


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    for folder in PRODUCT:
        files += sorted((ROOT / folder).rglob("*.md"))
    return [f for f in files if f.is_file()]


def code_files() -> list[Path]:
    files = [ROOT / name for name in ROOT_FILES if (ROOT / name).is_file()]
    for folder in PRODUCT:
        for path in sorted((ROOT / folder).rglob("*")):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix in (".py", ".yaml", ".yml", ".toml", ".cfg"):
                files.append(path)
    return files


def test_the_scan_sees_the_tree():
    """Guards against a scan that silently finds nothing (the checks below would then pass)."""
    assert ROOT / "README.md" in markdown_files()
    names = {p.relative_to(ROOT).as_posix() for p in code_files()}
    assert {"rollout/april.py", "swarm/guard.py", "pyproject.toml"} <= names
    assert any(p.suffix == ".yaml" for p in code_files())


def test_the_checker_catches_missing_files_and_sections(tmp_path):
    """The checks themselves, on a made-up repository (with a file just outside it)."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "rollout").mkdir()
    (repo / "README.md").write_text("# Top\n", encoding="utf-8")
    (repo / "rollout" / "april.py").write_text("", encoding="utf-8")
    (tmp_path / "outside.md").write_text("# Outside\n", encoding="utf-8")
    doc = repo / "docs" / "GUIDE.md"
    doc.write_text("# Title\n\n## A section\n\n[ok](../README.md) [bad](nowhere.md) "
                   "[anchor](#a-section) [bad anchor](#no-such) `not/there.md` [up](../../outside.md)\n"
                   "`rollout/april.py` `rollout/gone.py` `runs/not-a-product-path`\n"
                   "```\n[fenced](ignored.md)\n```\n", encoding="utf-8")
    problems = check_markdown(doc, repo)
    assert sorted(p.split(": ", 1)[1] for p in problems) == [
        "link to #no-such: no heading with anchor #no-such",
        "link to ../../outside.md: no such file in the repository",
        "link to nowhere.md: no such file in the repository",
        "names not/there.md: no such file in the repository",
        "quotes rollout/gone.py: no such path in the repository",
    ]
    code = repo / "pkg.py"
    code.write_text('"""See docs/GUIDE.md, "A section", and docs/GUIDE.md, "Gone"."""\n'
                    '# the design: ../shared/DESIGN.md\nx = "strings are not docs: NOTES.md"\n',
                    encoding="utf-8")
    assert check_code_file(code, repo) == [
        'pkg.py:1: names docs/GUIDE.md: no section "Gone"',
        "pkg.py:2: names ../shared/DESIGN.md: no such file in the repository",
    ]


def test_markdown_links_resolve():
    problems = [p for f in markdown_files() for p in check_markdown(f)]
    assert not problems, "broken doc links:\n" + "\n".join(problems)


def test_docstrings_and_comments_name_existing_docs():
    problems = [p for f in code_files() for p in check_code_file(f)]
    assert not problems, "docstrings/comments name docs that are not in the repository:\n" + "\n".join(problems)
