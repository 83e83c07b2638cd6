"""The chaos suite's repeat count and its summary: each scenario runs `CHAOS_RUNS` times (default 1; the issue's
figure is 20), each run with its own timing, and the end of the session prints scenario by runs by outcomes."""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any

import pytest

#: Outcomes per scenario, in the order they ran: (outcome, seconds).
RESULTS: dict[str, list[tuple[str, float]]] = defaultdict(list)
#: Seconds from each run's fault to what the scenario waits for (the error, the answer), per scenario.
RECOVERIES: dict[str, list[float]] = defaultdict(list)
#: Seconds from each run's end of a fault (a network healed) to the ring formed again, per scenario.
REFORMS: dict[str, list[float]] = defaultdict(list)


def scenario_of(item: pytest.Item) -> str:
    """The scenario a test item runs: its name without `test_` and the run."""
    return item.name.split("[")[0].removeprefix("test_")


@pytest.fixture
def recovery(request: pytest.FixtureRequest) -> Any:
    """`recovery(seconds)` records how long the run took from its fault to the outcome it checks."""
    return RECOVERIES[scenario_of(request.node)].append


@pytest.fixture
def reformed(request: pytest.FixtureRequest) -> Any:
    """`reformed(seconds)` records how long the ring took to form again once the fault was over."""
    return REFORMS[scenario_of(request.node)].append


def chaos_runs() -> int:
    """How often each scenario runs (`CHAOS_RUNS`, at least 1)."""
    value = os.environ.get("CHAOS_RUNS", "1")
    try:
        runs = int(value)
    except ValueError as e:
        raise pytest.UsageError(f"CHAOS_RUNS must be a whole number, not {value!r}") from e
    if runs < 1:
        raise pytest.UsageError(f"CHAOS_RUNS must be at least 1, not {runs}")
    return runs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "run" in metafunc.fixturenames:
        metafunc.parametrize("run", range(chaos_runs()), ids=lambda i: f"run{i}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Any:
    outcome = yield
    report = outcome.get_result()
    if "run" not in getattr(item, "fixturenames", ()):
        return
    if report.when == "call" or (report.when == "setup" and report.failed):
        RESULTS[scenario_of(item)].append((report.outcome, report.duration))


def spread(seconds: list[float] | None) -> str:
    """`least-most` of some durations, `-` for none."""
    return f"{min(seconds):.1f}-{max(seconds):.1f}" if seconds else "-"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS:
        return
    write = terminalreporter.write_line
    write("")
    write("chaos: scenario by runs by outcomes")
    header = f"{'scenario':<40} {'runs':>5} {'passed':>7} {'failed':>7} {'slowest s':>10}"
    write(f"{header} {'fault to outcome s':>19} {'heal to ring s':>15}")
    for scenario, results in RESULTS.items():
        passed = sum(1 for outcome, _ in results if outcome == "passed")
        slowest = max(seconds for _, seconds in results)
        counts = f"{scenario:<40} {len(results):>5} {passed:>7} {len(results) - passed:>7} {slowest:>10.1f}"
        write(f"{counts} {spread(RECOVERIES.get(scenario)):>19} {spread(REFORMS.get(scenario)):>15}")
