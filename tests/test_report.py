"""Charts drawn by memoguard.report: never raise on odd input, draw the band where it belongs, stay readable."""
import math

import numpy as np
import pytest

from memoguard import report

SIZE = (512, 256)
WHITE = (255, 255, 255)


@pytest.mark.parametrize("series", [[], [[]], [[math.nan, math.nan]], [[None, math.nan]], [[0.0, 0.0]],
                                    [[0.03]], [[math.inf, 0.02]]])
@pytest.mark.parametrize("band", [None, [], [None], [[0.01, 0.02]], [[math.nan, 0.02], None]])
def test_score_plot_never_raises(series, band):
    img = report.score_plot(series, 0.0232, ["image 1: ok"], size=SIZE, title="t", band=band, window=1,
                            notes=["band measured at cfg 3.0, this run cfg 7.5"])
    assert img.size == SIZE
    img = report.score_plot(series, None, size=SIZE, band=band, window=None)
    assert img.size == SIZE


def test_no_score_is_said_in_words_not_left_blank():
    img = report.score_plot([[math.nan] * 4], 0.02, size=SIZE, empty="score unavailable at cfg 1")
    assert report.score_axes([[math.nan] * 4], 0.02, SIZE) is None
    assert (np.asarray(img).sum(axis=2) < 400).any(), "the picture must carry the message"


def test_single_point_is_drawn():
    img = report.score_plot([[0.03]], None, size=SIZE, band=None)
    axes = report.score_axes([[0.03]], None, SIZE)
    x, y = round(axes.x(0)), round(axes.y(0.03))
    assert img.getpixel((x, y)) == report.LINE_COLORS[0]


def _has(img, color) -> bool:
    return bool((np.asarray(img) == np.array(color, np.uint8)).all(axis=2).any())


def _band_case():
    series = [[0.017, 0.025, 0.035, 0.05, 0.07, 0.0945]]
    band = [[0.015, 0.022], [0.022, 0.03], [0.03, 0.042], None, [0.062, 0.08], [0.085, 0.11]]
    return series, band


def test_band_pixels_are_drawn_between_median_and_high_at_each_step():
    series, band = _band_case()
    img = report.score_plot(series, 0.0232, ["image 1: ok"], size=SIZE, band=band, window=1)
    axes = report.score_axes(series, 0.0232, SIZE, band=band, legend_lines=1)
    # between steps 2 and 3 (both measured): the band fills the middle of median..high, above high is empty
    xm = round((axes.x(1) + axes.x(2)) / 2)
    med, high = (0.022 + 0.03) / 2, (0.03 + 0.042) / 2
    assert img.getpixel((xm, round(axes.y((med + high) / 2)))) == report.BAND_FILL
    assert img.getpixel((xm, round(axes.y(high + 0.01)))) == WHITE
    assert img.getpixel((xm, round(axes.y(med - 0.006)))) == WHITE
    # step 4 has no band: nothing is interpolated across the gap
    xg = round((axes.x(2) + axes.x(3)) / 2)
    assert img.getpixel((xg, round(axes.y(0.045)))) == WHITE
    # the last two steps are measured again
    xl = round((axes.x(4) + axes.x(5)) / 2)
    assert img.getpixel((xl, round(axes.y((0.0735 + 0.095) / 2)))) == report.BAND_FILL


def test_window_is_shaded_and_the_threshold_drawn_only_across_it():
    series, band = _band_case()
    img = report.score_plot(series, 0.06, ["image 1: ok"], size=SIZE, band=None, window=2)
    axes = report.score_axes(series, 0.06, SIZE, legend_lines=1)
    y = round(axes.y(0.06))
    in_window = [img.getpixel((x, y)) for x in range(round(axes.column(0)[0]) + 1, round(axes.column(1)[1]) - 1)]
    assert report.THRESHOLD in in_window
    after = [img.getpixel((x, y)) for x in range(round(axes.column(2)[0]) + 2, round(axes.right) - 1)]
    assert report.THRESHOLD not in after
    assert img.getpixel((round(axes.x(1)), round(axes.y(0.09)))) == report.WINDOW_FILL
    assert img.getpixel((round(axes.x(3)), round(axes.y(0.09)))) == WHITE


def test_without_a_band_the_plot_says_so():
    series, _ = _band_case()
    with_band = report.score_plot(series, None, size=SIZE, band=_band_case()[1], no_band="NO BAND")
    without = report.score_plot(series, None, size=SIZE, band=[None] * 6, no_band="NO BAND")
    assert not _has(without, report.BAND_FILL)
    assert _has(with_band, report.BAND_FILL)
    axes = report.score_axes(series, None, SIZE)
    text_row = without.crop((int(axes.left) + 4, int(axes.top), int(axes.left) + 80, int(axes.top) + 14))
    assert (np.asarray(text_row).sum(axis=2) < 500).any()


def test_y_ticks_are_round_values():
    assert report.nice_ticks(0.104) == [0.0, 0.05, 0.1]
    assert report.nice_ticks(0.09) == [0.0, 0.025, 0.05, 0.075]
    assert report.nice_ticks(0.0) == [0.0]
    assert report.nice_ticks(math.nan) == [0.0]


def test_long_prompts_give_a_bounded_bar_chart():
    tokens = [f"word{i}" for i in range(120)]
    shares = [1 / 120] * 120
    img = report.token_bars(tokens, shares, width=512, title="token contributions")
    assert img.height <= 320
    short = report.token_bars(tokens[:6], shares[:6], width=512)
    assert short.height < img.height
    assert report.token_bars([], [], width=512).size[0] == 512
    assert report.token_bars(["a"], [math.nan]).height > 0


def test_scores_spanning_many_times_get_a_log_axis_so_the_first_steps_stay_readable():
    series = [[0.0277, 0.0303, 0.045, 0.0715, 0.116, 0.196, 0.468]]
    axes = report.score_axes(series, 0.0262, SIZE)
    assert axes.lo is not None and axes.ticks == [0.05, 0.1, 0.2] or axes.ticks[0] <= 0.05
    # the first step sits well above the bottom: 0.0277 vs 0.0262 is a visible gap, not one pixel
    assert axes.y(0.0262) - axes.y(0.0277) >= 3
    img = report.score_plot(series, 0.0262, size=SIZE, window=1)
    assert img.getpixel((round(axes.x(0)), round(axes.y(0.0277)))) == report.LINE_COLORS[0]
    assert report.score_axes([[0.02, 0.03]], None, SIZE).lo is None
