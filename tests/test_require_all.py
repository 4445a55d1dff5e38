"""tests/require_all.py: under DSNET_REQUIRE_ALL=1 every kind of skip fails, naming the test and the
reason; without it skips stay skips; xfail stays xfail either way."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SKIPPING = textwrap.dedent("""
    import pytest

    def test_runs():
        pass

    def test_skips_in_the_body():
        pytest.skip("no widget")

    @pytest.mark.skipif(True, reason="not on this platform")
    def test_marked_skipif():
        pass

    @pytest.fixture
    def widget():
        return pytest.importorskip("dsnet_no_such_package")

    def test_fixture_importorskip(widget):
        pass

    @pytest.mark.xfail(reason="known bug", strict=True)
    def test_known_bug():
        assert False
""")


def _pytest(tmp_path: Path, require_all: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "conftest.py").write_text(
        "from tests.require_all import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401\n")
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "test_module_skip.py").write_text('import pytest\npytest.importorskip("dsnet_no_such_module")\n')
    env = {k: v for k, v in os.environ.items() if k != "DSNET_REQUIRE_ALL"}
    env["PYTHONPATH"] = str(ROOT)
    if require_all is not None:
        env["DSNET_REQUIRE_ALL"] = require_all
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", "."], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)


def _summary(out: str) -> str:
    return out.strip().splitlines()[-1]


def test_every_skip_fails_under_require_all_naming_the_test_and_reason(tmp_path):
    done = _pytest(tmp_path, "1")
    assert done.returncode != 0
    out = done.stdout
    for test, reason in (("test_skipping.py::test_skips_in_the_body", "no widget"),
                         ("test_skipping.py::test_marked_skipif", "not on this platform"),
                         ("test_skipping.py::test_fixture_importorskip", "could not import 'dsnet_no_such_package'"),
                         ("test_module_skip.py", "could not import 'dsnet_no_such_module'")):
        assert re.search(rf"{re.escape(test)} was skipped \(.*{re.escape(reason)}.*\); DSNET_REQUIRE_ALL=1 requires "
                         "every test to run", out), (test, out[-3000:])
    assert re.search(r"1 failed, 1 passed, 1 xfailed, 3 errors", _summary(out)), out[-3000:]
    assert " skipped" not in _summary(out)


@pytest.mark.parametrize("require_all", [None, "0"])
def test_skips_stay_skips_otherwise(tmp_path, require_all):
    done = _pytest(tmp_path, require_all)
    assert done.returncode == 0, done.stdout[-3000:]
    assert re.search(r"1 passed, 4 skipped, 1 xfailed", _summary(done.stdout)), done.stdout[-3000:]
