"""A pytest plugin (loaded by tests/conftest.py): with ``DSNET_REQUIRE_ALL=1`` in the environment,
as .ci/run sets it, every skipped test fails, naming the test and the skip's reason. The optional
extras (onnx, onnxruntime, onnxscript, safetensors) make some tests skip where they are missing;
CI installs them, and this makes sure a test that still skips there is seen, not counted as passed.
xfail stays xfail."""
from __future__ import annotations

import os

import pytest

__all__ = ["REQUIRE_ALL", "pytest_runtest_makereport", "pytest_make_collect_report"]

REQUIRE_ALL = "DSNET_REQUIRE_ALL"


def _fail_if_skipped(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Under ``DSNET_REQUIRE_ALL=1``, turn a skip (not an xfail) into a failure that names the
    test and the skip's reason: in CI a missing extra or a platform check must not pass quietly."""
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get(REQUIRE_ALL) == "1":
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"{report.nodeid} was skipped ({reason}); {REQUIRE_ALL}=1 requires every test to run"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A skip in a test's setup, call or teardown (``pytest.skip``, ``skipif``, ``importorskip``)."""
    outcome = yield
    _fail_if_skipped(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """A skip while collecting a module (a module-level ``importorskip`` or ``pytest.skip``)."""
    outcome = yield
    _fail_if_skipped(outcome.get_result())
