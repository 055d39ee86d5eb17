"""The README and docs/: short, every relative link and image resolves, every page reachable, every file named."""

import re
from pathlib import Path

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 150  # issue 18: a README a newcomer reads in two minutes
OTHER_FILES = {
    "static/",
    "notebooks/inference.ipynb",
    "tests/",
    "docs/",
    ".ci/run",
    "pyproject.toml",
}  # in the file table


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code, where `](` and `#` are not markdown."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor in a markdown page, with GitHub's -1, -2 suffixes for repeated headings."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.MULTILINE):
        base = slug(heading)
        seen[base if base not in seen else f"{base}-{seen[base]}"] = 0
        seen[base] = seen.get(base, 0) + 1
    return set(seen)


def links(page: Path) -> list[str]:
    """The targets of a page's markdown links and images, `[text](target)` and `![alt](target)`, nested too."""
    return re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose(page.read_text()))


def broken_links(page: Path) -> list[str]:
    """The page's relative links whose file, or whose #anchor in a markdown file, does not exist."""
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not checked (no network in tests)
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.name}: {target} (no file {path})")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{page.name}: {target} (no heading #{anchor} in {file.name})")
    return broken


def test_the_checker_finds_broken_links_and_anchors(tmp_path):
    """The checker reports a missing file, a missing image and a missing heading, and ignores code and URLs."""
    (tmp_path / "there.png").write_bytes(b"")
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: yes\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[ok](other.md) [ok](other.md#a-code-heading-yes) [ok](other.md#twice-1) [ok](#page)\n"
        "![ok](there.png) [![ok](there.png)](other.md) [web](https://example.com/nowhere)\n"
        "`[not a link](gone.md)`\n```\n[not a link](gone.md)\n```\n"
        "[bad](missing.md) ![bad](gone.png) [bad](other.md#nowhere) [bad](#twice)\n"
    )
    assert broken_links(page) == [
        "page.md: missing.md (no file missing.md)",
        "page.md: gone.png (no file gone.png)",
        "page.md: other.md#nowhere (no heading #nowhere in other.md)",
        "page.md: #twice (no heading #twice in page.md)",
    ]


def test_every_relative_link_and_image_resolves():
    """Every relative link and image in README.md and docs/*.md names a file that exists, and a heading that does."""
    assert [problem for page in PAGES for problem in broken_links(page)] == []


def test_every_docs_page_is_linked_from_the_readme():
    """The README's links are the index of docs/: no page there is unreachable from it."""
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


def test_readme_is_short():
    """The README is a two-minute read: at most 150 lines."""
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines"


def test_readme_shows_the_three_everyday_things():
    """The README shows `python train.py`, editing config.py, and loading a checkpoint in a notebook."""
    text = (ROOT / "README.md").read_text()
    assert "python train.py\n" in text and "[`config.py`](config.py)" in text
    assert "load_checkpoint(latest_checkpoint())" in text


def test_readme_test_command_is_what_ci_runs():
    """The README's test command installs requirements-dev.txt and runs the pytest command .ci/run runs."""
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    command = re.search(r"^python -m venv .*requirements-dev\.txt && (python -m pytest.*)$", readme, re.MULTILINE)
    assert command and re.search(rf"^{re.escape(command[1])}$", ci, re.MULTILINE)


def test_the_file_table_names_every_top_level_script():
    """The README's "What each file is" table has a row for every top-level .py file and folder a reader meets."""
    table = (ROOT / "README.md").read_text().split("## What each file is", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"^\| `([^`]+)`", table, re.MULTILINE))
    assert ({p.name for p in ROOT.glob("*.py")} | OTHER_FILES) - named == set()
