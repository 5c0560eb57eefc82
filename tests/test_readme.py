"""The README's usage example runs as written, and .ci/run uses the README's test command."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_single_rank_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
    match = re.search(r"<!-- test-command -->\s*```bash\n(.*?)\n```", README, flags=re.S)
    assert match, "README has no marked test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci  # .ci/run extracts and runs exactly that block
