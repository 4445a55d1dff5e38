"""The package map (docs/design.md) as import-linter checks it: setup.cfg's contracts hold on dsnet
as it is, and each kind of import that would break the map is caught: an upward import at module
level, one hidden inside a function or under ``TYPE_CHECKING``, a loop between two modules of one
package, ``import dsnet`` inside the package, and ``report`` meeting ``deploy``.

Each broken case runs ``lint-imports`` on a copy of the package with one line added, so the
real tree is never touched.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINTER = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"

pytest.importorskip("importlinter", reason="import-linter is in the test extra: pip install -e '.[test]'")


def lint(tree: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with the repository's setup.cfg on the ``dsnet`` package found under ``tree``."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", LINTER], cwd=tree, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_package_map_holds_on_dsnet_as_it_is():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize("path,after,line,broken", [
    # the supernet reaching up into training
    ("dsnet/models/net.py", "from __future__ import annotations\n", "from dsnet.train.engine import Loop\n",
     "dsnet's packages import downward only"),
    # the same, hidden inside a function
    ("dsnet/layers/slimmable.py", "def check_choices(choices: Sequence[int], what: str) -> tuple[int, ...]:\n",
     "    from dsnet.models.net import DSNet  # noqa: F401\n", "dsnet's packages import downward only"),
    # a run's skeleton naming a stage driver for its annotations only
    ("dsnet/train/runs.py", "from __future__ import annotations\n",
     "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dsnet.train.stage_one import train_supernet\n",
     "no two modules of one package import each other"),
    # the package face, imported to register the models
    ("dsnet/prune/arch.py", "from __future__ import annotations\n", "import dsnet  # noqa: F401\n",
     "no dsnet module imports the package face"),
    # two commands of the same level meeting
    ("dsnet/report/compare.py", "from __future__ import annotations\n", "from dsnet.deploy.bench import bench_command\n",
     "dsnet's packages import downward only"),
])
def test_an_import_against_the_map_fails_lint_imports(tmp_path, path, after, line, broken):
    shutil.copytree(ROOT / "dsnet", tmp_path / "dsnet", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path / "setup.cfg")
    target = tmp_path / path
    text = target.read_text()
    assert after in text, f"{path} no longer has the line this test plants after: update the test"
    target.write_text(text.replace(after, after + line, 1))
    done = lint(tmp_path)
    assert done.returncode != 0, done.stdout
    summary = done.stdout[done.stdout.rindex("Contracts\n"):]
    assert broken in summary and "BROKEN" in summary.split(broken, 1)[1].split("\n\n")[0][:200], summary
