"""The dashboard's inline SVG charts: round axes, escaped text, and a clear word when there is nothing to draw."""

from __future__ import annotations

import re

import pytest

from fleet.hub.ui.charts import bar_chart, nice_ticks


@pytest.mark.parametrize(("largest", "integer", "expected"), [
    (3, True, [0, 1, 2, 3]), (9, True, [0, 5, 10]), (1234, True, [0, 500, 1000, 1500]), (0, True, [0, 1]),
    (1.0, False, [0, 0.5, 1.0]), (0.4, False, [0, 0.1, 0.2, 0.3, 0.4]),
])
def test_ticks_are_round_and_cover_the_largest_value(largest: float, integer: bool, expected: list[float]) -> None:
    assert nice_ticks(largest, integer=integer) == expected


def test_bars_scale_to_the_axis_and_text_is_escaped() -> None:
    svg = str(bar_chart(["<b>", "b"], {"uploads": [5, 10]}, title="Uploads & more", fmt="{:.0f}", height=230))
    assert "<b>" not in svg.replace("<svg", "") and "&lt;b&gt;" in svg and "Uploads &amp; more" in svg
    heights = [float(h) for h in re.findall(r'<rect x="[^"]+" y="[^"]+" width="[^"]+" height="([^"]+)"', svg)]
    assert len(heights) == 2 and heights[1] == pytest.approx(2 * heights[0])  # the axis tops at 10
    assert "<script" not in svg


def test_missing_values_say_n_a_and_an_empty_chart_says_so() -> None:
    svg = str(bar_chart(["m1", "m2"], {"a": [0.5, None], "b": [None, None]}, title="t", y_max=1.0))
    assert svg.count(">n/a<") == 3 and svg.count("<rect") == 1 + 2  # one bar, two legend swatches
    assert "no data yet" in str(bar_chart([], {"a": []}, title="t"))
    assert "no data yet" in str(bar_chart(["x"], {"a": [None]}, title="t"))
    with pytest.raises(ValueError, match="series 'a' has 1 values for 2 labels"):
        bar_chart(["x", "y"], {"a": [1]}, title="t")
