"""The repository documents itself: every `docs/<file>.md §N` cited in code, configs or the README exists,
and nothing cites files outside the repository or issue numbers."""
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [p for folder in ("wcl_fast", "pipelines", "kernels", "configs", "scripts", "tests")
           for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".yaml", ".sh")] + [REPO / "README.md", REPO / "Makefile"]
DOCS = sorted((REPO / "docs").glob("*.md"))


def test_every_docs_citation_resolves():
    cited = 0
    for path in SOURCES:
        for name, section in re.findall(r"docs/([\w-]+\.md)(?: §(\d+))?", path.read_text()):
            target = REPO / "docs" / name
            assert target.is_file(), f"{path.relative_to(REPO)} cites docs/{name}, which does not exist"
            if section:
                assert re.search(rf"^## §{section} ", target.read_text(), re.M), \
                    f"{path.relative_to(REPO)} cites docs/{name} §{section}, which has no such section"
            cited += 1
    assert cited >= 20  # the code does cite its documentation


def test_nothing_cites_files_outside_the_repository_or_issue_numbers():
    this = Path(__file__).resolve()
    assert len(DOCS) >= 4
    for path in SOURCES + DOCS:
        if path == this:
            continue
        text = path.read_text()
        for pattern in (r"\.\./shared", r"\bspec (wcl|objectives)\.md", r"\bspec section", r"\(issue \d+", r"\bissue #\d+ of", r"the issue's", r"\bissues \d"):
            assert not re.search(pattern, text), f"{path.relative_to(REPO)} matches {pattern!r}"
