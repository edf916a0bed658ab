"""The TRL examples of docs/api.md (```python trl blocks: they need TRL, so the main suite's example test skips
them) run as written in TRL's venv."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
BLOCKS = re.findall(r"```python trl\n(.*?)```", README, flags=re.S)


def test_readme_has_trl_examples():
    assert BLOCKS


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_trl_example_runs(i, capsys):
    exec(compile(BLOCKS[i], f"docs/api.md[python trl block {i}]", "exec"), {})
    assert capsys.readouterr().out.strip()
