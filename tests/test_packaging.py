"""The container recipe: lint it and check that every path it copies exists."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint comes with the [dev] extra")
def test_dockerfile_lints_clean():
    result = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_copies_existing_paths_and_serves_the_default_bundle():
    text = (ROOT / "Dockerfile").read_text()
    # COPY --from=STAGE copies from an earlier build stage, not from the repository.
    sources = [src for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE) for src in line.split()[:-1]]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which is not in the repository"
    assert "artifacts/default" in text and '"serve"' in text
    compose = (ROOT / "docker-compose.yml").read_text()
    assert '"${VQTOK_PORT:-8000}:8000"' in compose
