"""docs/ARCHITECTURE.md stays true to the tree, and the docs stand on their own.

- The code map has one row per Python file under services/flywheel/ (the generated v1/ is one
  folder row) and tools/, and every path it names exists.
- No Markdown page of the project sends a reader outside the repository, and no source file
  cites the design notes that never were part of it; every citation of an ARCHITECTURE.md
  section names a heading that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARCH = ROOT / "docs" / "ARCHITECTURE.md"
MAPPED = ("services/flywheel", "tools")  # every .py file below these has its own row
GENERATED = "services/flywheel/v1/"  # one row for the folder


def code_map() -> list[str]:
    """The first backticked cell of every row of the 'Code map' table, in order."""
    text = ARCH.read_text()
    m = re.search(r"^## Code map\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, "docs/ARCHITECTURE.md has no '## Code map' section"
    paths = []
    for line in m.group(1).splitlines():
        cell = re.match(r"\|\s*`([^`]+)`\s*\|", line)
        if cell:
            paths.append(cell.group(1))
    assert paths, "the code map in docs/ARCHITECTURE.md has no rows of the form | `path` | what |"
    return paths


def source_files() -> list[str]:
    files = []
    for top in MAPPED:
        for p in sorted((ROOT / top).rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            if rel.startswith(GENERATED) or "__pycache__" in rel:
                continue
            files.append(rel)
    return files


def test_every_source_file_has_its_own_row():
    rows = set(code_map())
    missing = [f for f in source_files() if f not in rows]
    assert not missing, (
        "docs/ARCHITECTURE.md's code map has no row for these files; add one row each "
        "(| `path` | what it is |):\n  " + "\n  ".join(missing)
    )


def test_generated_code_has_one_folder_row():
    rows = code_map()
    assert GENERATED in rows, f"the code map needs a row for the generated folder `{GENERATED}`"
    inside = [r for r in rows if r.startswith(GENERATED) and r != GENERATED]
    assert not inside, f"generated files get no rows of their own, only `{GENERATED}`: {inside}"


def test_every_mapped_path_exists():
    rows = code_map()
    gone = [r for r in rows if not (ROOT / r).exists()]
    assert not gone, (
        "docs/ARCHITECTURE.md's code map names paths that do not exist; remove or rename these rows:\n  "
        + "\n  ".join(gone)
    )
    dupes = sorted({r for r in rows if rows.count(r) > 1})
    assert not dupes, f"the code map lists these paths more than once: {dupes}"


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


# What sends a reader outside the repository: a relative link climbing above the root, the
# workspace's shared folder, or the design notes that were never part of the project.
OUTSIDE = [
    (re.compile(r"DESIGN\.md"), "names DESIGN.md (not in the repository; say it in docs/ARCHITECTURE.md)"),
    (re.compile(r"(^|[\s(\[`'\"/])shared/"), "points into a shared/ folder outside the repository"),
    (re.compile(r"/work/"), "names an absolute path of a development machine"),
]
LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def test_docs_do_not_point_outside_the_repository():
    problems = []
    for page in markdown_pages():
        rel = page.relative_to(ROOT).as_posix()
        for n, line in enumerate(page.read_text().splitlines(), 1):
            for pattern, why in OUTSIDE:
                if pattern.search(line):
                    problems.append(f"{rel}:{n}: {why}: {line.strip()}")
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target) or target.startswith("#"):
                    continue  # a URL or an anchor on the same page
                path = target.split("#", 1)[0]
                resolved = (page.parent / path).resolve()
                if not resolved.is_relative_to(ROOT):
                    problems.append(f"{rel}:{n}: links outside the repository: {target}")
                elif not resolved.exists():
                    problems.append(f"{rel}:{n}: links to a file that does not exist: {target}")
    assert not problems, "\n".join(problems)


SOURCES = ("services", "tools", "protos")
SOURCE_SUFFIXES = {".py", ".proto", ".sh", ".toml", ".yaml", ".yml", ".txt", ".cfg"}


def source_texts() -> list[tuple[str, str]]:
    out = []
    for top in SOURCES:
        for p in sorted((ROOT / top).rglob("*")):
            if p.is_file() and p.suffix in SOURCE_SUFFIXES and "__pycache__" not in p.parts:
                out.append((p.relative_to(ROOT).as_posix(), p.read_text(errors="replace")))
    return out


def test_no_source_file_cites_design_md():
    hits = [
        f"{rel}:{n}: {line.strip()}"
        for rel, text in source_texts()
        for n, line in enumerate(text.splitlines(), 1)
        if "DESIGN.md" in line
    ]
    assert not hits, (
        "these lines cite DESIGN.md, which is not in the repository; cite the section of "
        "docs/ARCHITECTURE.md instead, e.g. (docs/ARCHITECTURE.md, 'Kafka topics'):\n  " + "\n  ".join(hits)
    )


def test_cited_architecture_sections_exist():
    headings = {m.group(1).strip().strip("`") for m in re.finditer(r"^#{2,4} (.+)$", ARCH.read_text(), re.M)}
    cite = re.compile(r"docs/ARCHITECTURE\.md,\s*['\"]([^'\"]+)['\"]")
    bad = []
    for rel, text in source_texts():
        # A citation may wrap onto the next line of a docstring or comment.
        flat = re.sub(r"\s*\n\s*(?:#|//)?\s*", " ", text)
        for name in cite.findall(flat):
            if name not in headings:
                bad.append(f"{rel}: cites '{name}'")
    assert not bad, (
        "these files cite a section of docs/ARCHITECTURE.md that has no heading of that name "
        f"(headings: {sorted(headings)}):\n  " + "\n  ".join(bad)
    )
