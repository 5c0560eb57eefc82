"""README as a newcomer reads it: the tensor-parallel script runs as written (2 CPU ranks under
torchrun), the set-up commands are marked and CI runs them in README order before anything else,
and the packaging facts README relies on hold (version, py.typed, LICENSE, test requirements).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

import allreduce_rms

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def marked_block(name: str, lang: str) -> str:
    match = re.search(rf"<!-- {name} -->\s*```{lang}\n(.*?)\n```\s*<!-- /{name} -->", README, flags=re.S)
    assert match, f"README has no {lang} block marked <!-- {name} --> ... <!-- /{name} -->"
    return match.group(1)


def test_tp_example_runs_as_written(tmp_path):
    script = tmp_path / "tp_example.py"
    script.write_text(marked_block("tp-example", "python"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU over gloo, as README says it runs without GPUs
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for rank in (0, 1):
        assert f"rank {rank}: fallback path (rank 0: device cpu is not a GPU)" in out, out
        assert f"rank {rank}: q (16, 3072), k (16, 512), torch.bfloat16" in out, out


def test_setup_commands_are_marked_and_in_order():
    main = marked_block("main-command", "bash")
    test = marked_block("test-command", "bash")
    assert README.index("<!-- main-command -->") < README.index("<!-- test-command -->")
    # the main command uses --plot, so it installs the plot extra; it builds the package once
    assert "--plot" in main and '".[plot]"' in main and main.count("pip install") == 1
    # the test command runs against the installed package: no second build of it
    assert "pip install ." not in test and 'pip install ".' not in test
    assert "python -m pytest" in test


def test_ci_runs_the_readme_commands_first_in_readme_order():
    main_at = CI.index("run_readme_command main-command")
    test_at = CI.index("run_readme_command test-command")
    assert main_at < test_at
    before = CI[:main_at]
    # before the main command the venv holds only torch: nothing else is pip-installed
    installs = re.findall(r"pip install[^\n]*", before)
    assert installs and all("torch" in line or "--upgrade pip" in line for line in installs), installs
    assert "auditwheel repair" in CI and "manylinux" in CI


def test_test_requirements_match_the_test_extra():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    listed = [line.strip() for line in (ROOT / "tests" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert sorted(listed) == sorted(extra)


def test_version_comes_from_the_metadata():
    from importlib.metadata import version

    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert allreduce_rms.__version__ == version("allreduce-rms") == declared


def test_the_package_is_typed_and_licensed():
    package = pathlib.Path(allreduce_rms.__file__).parent
    assert (package / "py.typed").exists(), "py.typed is not installed beside the package"
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
