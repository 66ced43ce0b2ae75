"""The students' Pareto plot: a real PNG from real rows, every candidate drawn, and a clear error for no rows."""

from __future__ import annotations

import pytest
from PIL import Image

from hashdistill.errors import UserError
from hashdistill.plots import plot_pareto

ROWS = [  # the second row lies inside the first one's x range, so only its dotted line tells the plots apart
    {"arch": "lcnet_075", "deployed": "fp32", "deployed_vs_teacher": 0.091, "map_ratio": 0.930},
    {"arch": "mobilenetv2_050", "deployed": "phone", "deployed_vs_teacher": 0.08, "map_ratio": None}]


def test_the_pareto_plot_is_a_png_and_a_candidate_without_map_changes_it(tmp_path):
    both = plot_pareto(ROWS, tmp_path / "both.png", 0.05, 0.93)
    one = plot_pareto(ROWS[:1], tmp_path / "one.png", 0.05, 0.93)
    with Image.open(both) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert both.read_bytes() != one.read_bytes()  # the undistilled candidate's line is drawn


def test_no_rows_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="at least one row"):
        plot_pareto([], tmp_path / "none.png", 0.05, 0.93)
    assert not (tmp_path / "none.png").exists()
