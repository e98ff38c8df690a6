"""The benchmarks' shared parts: statistics, charts (real PNGs showing as many points as the data has) and the
self-contained HTML report, opened in headless Chromium with its selector clicked."""

from __future__ import annotations

import re

import pytest

from bench import charts
from bench.html_report import View, write_html
from bench.stats import summary
from tests.browser import Browser

PNG = b"\x89PNG\r\n\x1a\n"


def test_summary_figures():
    s = summary([4.0, 1.0, 3.0, 2.0])
    assert s["n"] == 4 and s["min"] == 1.0 and s["max"] == 4.0 and s["mean"] == 2.5
    assert s["p50"] == 2.5 and s["p90"] == pytest.approx(3.7) and s["p99"] == pytest.approx(3.97)
    assert s["std"] == pytest.approx(1.2909944)
    assert summary([5])["std"] == 0.0 and summary([])["p90"] is None and summary([])["n"] == 0


def test_charts_are_pngs_with_their_points(tmp_path):
    made = {
        charts.histogram(tmp_path / "h.png", [1.0, 2.0, 2.0, 3.5, 9.0], title="t", xlabel="ms"): 5,
        charts.scatter(tmp_path / "s.png", [("1", 1.0, 10.0), ("2", 2.0, 18.0), ("4", 4.0, 30.0)], title="t",
                       xlabel="ms", ylabel="tok/s"): 3,
        charts.lines(tmp_path / "l.png", [8, 16, 32], {"p50": [1.0, 2.0, None], "p90": [2.0, 3.0, 5.0]},
                     title="t", xlabel="users", ylabel="s", limits={"SLO": 2.5}, mark=("here", 16)): 5,
        charts.bars(tmp_path / "b.png", ["1", "2"], {"weights": [3.0, 3.0], "kv": [1.0, 2.0]}, title="t",
                    ylabel="GiB"): 4,
    }
    for path, points in made.items():
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000
        assert charts.points_of(path) == points


def _report(tmp_path):
    h1 = charts.histogram(tmp_path / "h1.png", [1.0, 2.0, 2.0], title="batch 1", xlabel="ms")
    h8 = charts.histogram(tmp_path / "h8.png", [5.0, 6.0], title="batch 8", xlabel="ms")
    return write_html(tmp_path / "report.html", title="Engine <benchmark>", intro="what it measured",
                      header={"device": "cpu"}, summary=[{"batch": 1, "decode ms": 2.25}],
                      charts=[h1], views=[View("batch 1", [{"p50 ms": 2.0}], [h1]), View("batch 8", [{"p50 ms": 5.5}],
                                                                                          [h8])])


def test_the_report_is_self_contained(tmp_path):
    page = _report(tmp_path).read_text()
    assert "Engine &lt;benchmark&gt;" in page  # escaped
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must load nothing from a network"
    assert page.count("data:image/png;base64,") == 3 and page.count('<section class="view"') == 2


@pytest.mark.skipif(not Browser.available(), reason="Debian's chromium is not installed")
def test_the_selector_switches_views_in_chromium(tmp_path):
    page = _report(tmp_path)
    browser = Browser(tmp_path / "profile")
    try:
        browser.open(page)
        hidden = "[...document.querySelectorAll('section.view')].map(s => s.hidden)"
        assert browser.evaluate(hidden) == [False, True]  # the first choice shows at first
        browser.click('#selector button[data-view="1"]')
        assert browser.evaluate(hidden) == [True, False]
        assert browser.evaluate("document.querySelector('#selector [aria-selected=true]').textContent") == "batch 8"
        shot = browser.screenshot(tmp_path / "shot.png")
        assert shot.read_bytes().startswith(PNG)
        assert browser.errors() == []
    finally:
        browser.close()
