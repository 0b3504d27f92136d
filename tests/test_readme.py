"""The README's quickstart runs as written: every fenced shell and Python block of its Quickstart section
is executed, in order, in a fresh directory that sees this checkout's `.venv` (as a fresh clone after
`make setup` would), and each command must succeed."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"```(bash|sh|python)\n(.*?)```", re.S)


def quickstart_blocks() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    return FENCE.findall(section)


def shell_commands(block: str) -> list[str]:
    """One command per line; a trailing comment is dropped, a line ending in a backslash continues."""
    commands, current = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#.*$", "", line).rstrip()
        if not line or line.lstrip().startswith("#"):
            continue
        current += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


def test_the_quickstart_has_shell_and_python_blocks():
    kinds = {kind for kind, _ in quickstart_blocks()}
    assert {"bash", "python"} <= kinds


def test_every_quickstart_snippet_runs_as_written(tmp_path):
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    python = str(ROOT / ".venv" / "bin" / "python")
    for kind, block in quickstart_blocks():
        if kind == "python":
            proc = subprocess.run([python, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"README Python block failed:\n{block}\n{proc.stderr[-3000:]}"
            continue
        for command in shell_commands(block):
            proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert proc.returncode == 0, f"README command failed: {command}\n{proc.stderr[-3000:]}"
            assert "Traceback" not in proc.stderr, command
