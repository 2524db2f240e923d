"""Collects the reliability figures and prints them in the test-suite summary."""

from collections import Counter

import pytest

FIGURES = {"cases": Counter(), "entry_points": set(), "raised_clear_error": 0, "state_changes": 0,
           "wrong_exception": 0}


@pytest.fixture
def figures():
    return FIGURES


def pytest_terminal_summary(terminalreporter):
    f = FIGURES
    total = sum(f["cases"].values())
    if not total:
        return
    by_category = ", ".join(f"{k} {v}" for k, v in sorted(f["cases"].items()))
    terminalreporter.write_line(
        f"kvcl reliability: {total} refused calls across {len(f['entry_points'])} public entry points "
        f"({by_category}); clear kvcl errors {f['raised_clear_error']}/{total}, "
        f"wrong exception {f['wrong_exception']}, state changes after a refusal {f['state_changes']}")
