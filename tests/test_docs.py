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


# --- the default run's figures: config.py's epochs, and one accuracy, wherever the docs name them --------------

# "defaults: 8 epochs", "the default (8 epochs", "a default run (8 epochs", "the default `python train.py` (8 epochs":
# how a page names the epochs of the default run. "the default recipe (augmented) for 3 epochs" is another run, and
# "fd3b740's default" an old one.
DEFAULT_EPOCHS = re.compile(r"(?<!'s )\bdefaults?\b[^.\n|]{0,25}?[(:] ?(\d+) epochs\b")
# "the default `python train.py` now reaches **99.39%**": a bold accuracy close after "default", in one sentence.
DEFAULT_ACCURACY = re.compile(r"(?<!'s )\bdefault\b[^.\n|]{0,40}?\*\*(\d+\.\d+%)\*\*")
PAGES_WITH_DEFAULT_EPOCHS = {"README.md", "results.md", "torchrun.md", "troubleshooting.md"}


def flowing(page: Path) -> str:
    """The page's prose with each paragraph's lines joined, so a phrase broken across lines is still found."""
    return re.sub(r"(?<!\n)\n(?![\n|])", " ", prose(page.read_text()))


def table(page: Path, first_heading: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose first heading is `first_heading`, as {heading: cell}, bold removed."""
    lines = page.read_text().split(f"\n| {first_heading} |", 1)[1].split("\n\n", 1)[0].splitlines()
    cells = [[cell.strip().strip("*") for cell in line.strip().strip("|").split("|")] for line in lines]
    headings = [first_heading, *cells[0]]
    return [dict(zip(headings, row)) for row in cells[2:]]


def test_the_default_run_checkers_find_the_phrases_and_only_them():
    """The patterns catch the default run's epochs and accuracy as the docs write them, and not other runs'."""
    text = (
        "CNN (defaults: 8 epochs, augmented). So the default (8 epochs with augmentation) wins. A full default run "
        "(8 epochs) differs. The default `python train.py` now reaches **99.39%** here. The default recipe "
        "(augmented) for 3 epochs. Short runs of the default: with 2 epochs. fd3b740's default, 4 epochs, **99.23%**."
    )
    assert DEFAULT_EPOCHS.findall(prose(text)) == ["8", "8", "8"]
    assert DEFAULT_ACCURACY.findall(prose(text)) == ["99.39%"]


def test_docs_give_the_default_run_config_pys_epochs():
    """Wherever README.md and docs/ name the default run's epochs, they are config.py's `epochs`, so a change of the
    default shows every sentence that must follow it."""
    from config import Config

    found = {page.name: [int(n) for n in DEFAULT_EPOCHS.findall(flowing(page))] for page in PAGES}
    assert {name for name, epochs in found.items() if epochs} >= PAGES_WITH_DEFAULT_EPOCHS, found
    assert {name: epochs for name, epochs in found.items() if set(epochs) - {Config().epochs}} == {}


def test_the_readme_and_docs_give_results_mds_accuracy_for_the_default_run():
    """docs/results.md's table is the one source of the default run's figures: the README's headline accuracy, its
    table's rows, and each page's "the default ... **N%**" give its numbers. After a new measurement, update
    results.md's table, then what this test names."""
    results = {row["run"].split()[0]: row for row in table(ROOT / "docs" / "results.md", "run")}
    readme = {row["run"].split()[0]: row for row in table(ROOT / "README.md", "run")}
    for name, row in readme.items():
        assert {k: v for k, v in row.items() if k != "run"} == {k: results[name][k] for k in row if k != "run"}, name
    accuracy = results["CNN"]["test"]
    headline = re.search(r"\*\*(\d+\.\d+%) test accuracy\*\*", (ROOT / "README.md").read_text())
    assert headline and headline[1] == accuracy
    stated = {page.name: DEFAULT_ACCURACY.findall(flowing(page)) for page in PAGES}
    assert {name: figures for name, figures in stated.items() if set(figures) - {accuracy}} == {}


def results_config() -> dict[str, str]:
    """The `config:` line that train.py printed for results.md's CNN row, as {field: value}."""
    line = re.search(r"^config: (.+)$", (ROOT / "docs" / "results.md").read_text(), re.MULTILINE)
    assert line, "docs/results.md shows no `config:` line of the run behind its figures"
    return dict(pair.split("=", 1) for pair in line[1].split())


# Fields that say where a run reads and writes, set by results.md's own command: not part of the recipe.
WHERE = {"data_dir", "download", "out_dir", "run_name", "tensorboard"}


def test_results_md_was_measured_with_todays_defaults():
    """docs/results.md's figures were measured with config.py's defaults: change a default, and this fails until
    the figures are measured again (benchmarks and commands in results.md) and its `config:` line replaced."""
    from dataclasses import asdict

    from config import Config

    recorded, today = results_config(), {k: str(v) for k, v in asdict(Config()).items()}
    assert recorded.keys() == today.keys(), "results.md's config line names other fields than config.py"
    differ = {k: (recorded[k], today[k]) for k in today if k not in WHERE and recorded[k] != today[k]}
    assert differ == {}, f"config.py's defaults differ from those results.md was measured with: {differ}"


def test_training_mds_sample_output_is_results_mds_run():
    """training.md's sample output is the run of results.md's CNN row: the same epochs, best val and test accuracy."""
    results = {row["run"].split()[0]: row for row in table(ROOT / "docs" / "results.md", "run")}["CNN"]
    sample = (ROOT / "docs" / "training.md").read_text()
    test = re.search(r"^test: loss [\d.]+, accuracy ([\d.]+%) \(best\.pt, epoch (\d+), val ([\d.]+%)\)", sample, re.M)
    assert test, "training.md shows no `test:` line"
    assert (test[1], test[3]) == (results["test"], results["best val"])
    rows = re.findall(r"^ +(\d+) +[\d.]+ +[\d.]+% +[\d.]+ +([\d.]+)% ", sample, re.MULTILINE)
    assert [int(epoch) for epoch, _ in rows] == list(range(1, int(results_config()["epochs"]) + 1))
    assert f"{max(float(val) for _, val in rows):.2f}%" == results["best val"]
