"""README's two set-up commands stay true: CI runs the test command verbatim, and the
main-job command's corral steps succeed on the built-in demo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```bash\n(.*?)```", README, re.S)


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("pip install") and "pytest" in line)
    assert command in BLOCKS[1]


def test_readme_main_job_runs(tmp_path: Path) -> None:
    steps = [s.strip() for s in BLOCKS[0].strip().split("&&") if s.strip().startswith("corral ")]
    assert steps and steps[0].startswith("corral convert demo:scout --to gguf")
    for step in steps:
        args = step.split()[1:]
        res = subprocess.run([sys.executable, "-m", "toolbox.cli.main", *args], cwd=tmp_path, capture_output=True,
                             text=True, check=False)
        assert res.returncode == 0, (step, res.stderr[-2000:])
    assert (tmp_path / "llama-4-scout-demo.gguf").is_file()
