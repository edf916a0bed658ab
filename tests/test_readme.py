"""The README is a front page whose links resolve, and the Python examples of the README and docs/api.md run as
written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLES = {p.relative_to(ROOT).as_posix(): re.findall(r"```python\n(.*?)```", p.read_text(), flags=re.S)
            for p in (ROOT / "README.md", ROOT / "docs" / "api.md")}
BLOCKS = [(page, i, block) for page, blocks in EXAMPLES.items() for i, block in enumerate(blocks)]


def test_there_are_examples_and_the_readme_is_a_front_page():
    assert EXAMPLES["README.md"] and len(EXAMPLES["docs/api.md"]) >= 2
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


@pytest.mark.parametrize("page,i,block", BLOCKS, ids=[f"{p}[{i}]" for p, i, _ in BLOCKS])
def test_example_runs(page, i, block, capsys):
    exec(compile(block, f"{page}[python block {i}]", "exec"), {})
    assert capsys.readouterr().out.strip()  # each example prints its result


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not links
    links = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
    broken = [link for link in links if not link.startswith(("http://", "https://", "#", "mailto:"))
              and not (page.parent / link.split("#")[0]).exists()]
    assert not broken, broken
