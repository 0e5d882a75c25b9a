"""The benchmark harness never prints a figure it did not measure.

`--quick` printed its memory row as "51.8 → nan MB (+nan%)": its sampling never met the last
file count, and the report formatted the NaN it was given.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from benchmarks.cases import sample_points
from benchmarks.run import plan, render, rows


@pytest.mark.parametrize("quick", [True, False])
def test_memory_sampling_ends_exactly_at_the_last_file(quick: bool) -> None:
    _, serial = plan(quick)
    (params,) = [p for case, p in serial if case == "memory"]
    points = sample_points(params["first"], params["files"])
    assert points[0] == params["first"] and points[-1] == params["files"]
    assert len(points) == 11 and points == sorted(set(points))


def test_sample_points_for_odd_counts() -> None:
    assert sample_points(2000, 8001)[-1] == 8001
    assert sample_points(5, 8) == [5, 6, 7, 8]
    assert sample_points(8, 8) == [8]
    with pytest.raises(ValueError, match="first"):
        sample_points(9, 8)


def memory_result(**changes: Any) -> dict[str, Any]:
    result = {"files": 8000, "processed": 8000, "seconds": 300.0, "first": 2000,
              "rss_first_mb": 51.8, "rss_end_mb": 52.3, "growth_mb": 0.5, "hwm_mb": 60.0,
              "samples": [(2000, 51.8), (5000, 52.0), (8000, 52.3)]}
    return {"case": "memory", "params": {"files": 8000, "first": 2000, "batch": 200},
            "result": {**result, **changes}}


def test_a_measured_row_is_printed() -> None:
    table, _, misses, unmeasured = rows([memory_result()])
    assert table[0][2].startswith("51.8 → 52.3 MB (+1.0%")
    assert (misses, unmeasured) == ([], [])


@pytest.mark.parametrize("changes", [
    {"rss_end_mb": math.nan, "growth_mb": math.nan},  # what --quick reported
    {"samples": [(2000, 51.8), (8000, math.nan)]},
    {"rss_first_mb": 0.0},
])
def test_a_missing_sample_is_never_printed_as_a_figure(changes: dict[str, Any]) -> None:
    results = [memory_result(**changes)]
    table, _, misses, unmeasured = rows(results)
    assert len(unmeasured) == 1 and unmeasured[0].startswith("memory files=8000 first=2000")
    assert misses == [table[0][0]]
    assert "not measured" in table[0][2]
    figures = render(results, True, 60.0, 1.0, "python -m benchmarks.run --quick").split(
        "## How each figure")[0]
    assert not re.search(r"\b(nan|inf)\b", figures, re.IGNORECASE), figures


def test_a_value_missing_from_a_result_is_named() -> None:
    result = memory_result()
    del result["result"]["rss_end_mb"]
    _, _, _, unmeasured = rows([result])
    assert unmeasured == ["memory files=8000 first=2000 batch=200: no 'rss_end_mb' in the result"]
