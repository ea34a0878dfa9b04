"""The real Codex CLI run against a stack, as a developer would run it: one `codex exec`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from extproc.devstack.stack import Stack

# Installed by `make codex-cli` (npm), which `make test` runs.
CODEX = Path(__file__).resolve().parents[1] / ".tools" / "node_modules" / ".bin" / "codex"


def codex_exec(
    stack: Stack,
    secret: str,
    workdir: Path,
    *,
    websockets: bool = False,
    timeout: float = 120,
    model: str | None = "gpt-5.1-codex",
) -> subprocess.CompletedProcess[str]:
    """Run `codex exec "say hello"` with a fresh CODEX_HOME whose provider is the stack.

    `websockets` switches on Codex's websocket transport, which it then tries first.
    `model=None` leaves the model to the CLI's own default (what a developer gets).
    The CLI's own exit code and output are returned for the test to judge.
    """
    assert CODEX.exists(), "run `make codex-cli` (make test does) to install the Codex CLI"
    home = workdir / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        (f'model = "{model}"\n' if model else "")
        + 'model_provider = "extproc"\n'
        + ("[features]\nresponses_websockets = true\n" if websockets else "")
        + "[model_providers.extproc]\n"
        'name = "extproc"\n'
        f'base_url = "{stack.base_url}"\n'
        'env_key = "EXTPROC_KEY"\n'
        'wire_api = "responses"\n' + ("supports_websockets = true\n" if websockets else "")
    )
    return subprocess.run(
        [str(CODEX), "exec", "--skip-git-repo-check", "say hello"],
        cwd=workdir,
        env={**os.environ, "CODEX_HOME": str(home), "EXTPROC_KEY": secret},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
