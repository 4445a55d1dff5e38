"""The project's text files: what a reader opens must be whole (no merge leftovers) and name files
that exist.

No module's tests: the docs and the repository's text files are what is checked."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tracked(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.stdout.split()]


def test_no_merge_conflict_markers():
    marker = re.compile(r"^(<{7} |={7}$|>{7} )", re.M)
    files = _tracked("*.md", "*.py", "*.yml", "*.cfg", "*.toml", "*.sh")
    assert files
    bad = [f"{p.relative_to(ROOT)}:{s[:m.start()].count(chr(10)) + 1}"
           for p in files for s in [p.read_text()] for m in marker.finditer(s)]
    assert not bad, f"merge conflict markers in {bad}"


def test_readme_names_existing_configs_and_docs():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`((?:configs/)?[\w.-]+\.yml)`", readme))
    assert named
    missing = [n for n in named if not (ROOT / (n if "/" in n else f"configs/{n}")).is_file()]
    assert not missing, f"README names configs that do not exist: {missing}"
    links = re.findall(r"\]\(((?:docs/)?[\w/.-]+\.md)(?:#[\w-]+)?\)", readme)
    assert [l for l in links if not (ROOT / l).is_file()] == []
