"""The HTML report in a real headless Chromium: it loads cleanly and every chart renders.

Needs Debian's ``chromium`` and ``chromium-driver`` (``/usr/bin/chromium``,
``/usr/bin/chromedriver``) and selenium. Without them the test is skipped with the
reason, unless EDGEFARM_REQUIRE_BROWSER=1 (as CI sets it), where it fails instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from results.report import build_report, render
from tests.unit.test_report import EVIL, memory_history, row, sample_history, sample_rows
from tests.unit.test_report import sample_verdicts as verdicts

pytestmark = pytest.mark.integration

CHROMIUM = os.environ.get("EDGEFARM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("EDGEFARM_CHROMEDRIVER", "/usr/bin/chromedriver")
REQUIRE_ENV = "EDGEFARM_REQUIRE_BROWSER"

# Recorded before any page script runs: uncaught errors, failed loads, CSP violations.
WATCH_ERRORS = """
window.__reportErrors = [];
window.addEventListener('error', function (e) {
  window.__reportErrors.push('error: ' + (e.message || (e.target && e.target.outerHTML) || e));
}, true);
window.addEventListener('unhandledrejection', function (e) {
  window.__reportErrors.push('unhandled rejection: ' + e.reason);
});
document.addEventListener('securitypolicyviolation', function (e) {
  window.__reportErrors.push('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI);
});
"""

# Per chart: its kind, bounding box, marks, and the smallest text box (fonts render).
MEASURE_CHARTS = """
return Array.from(document.querySelectorAll('svg.chart')).map(function (svg) {
  var box = svg.getBoundingClientRect();
  var count = function (sel) { return svg.querySelectorAll(sel).length; };
  var minBox = function (sel) {
    var nodes = Array.from(svg.querySelectorAll(sel));
    if (!nodes.length) { return null; }
    return Math.min.apply(null, nodes.map(function (n) {
      var b = n.getBBox(); return Math.min(b.width, b.height);
    }));
  };
  return {
    kind: svg.classList.contains('pareto') ? 'pareto' : 'history',
    title: svg.querySelector('title').textContent,
    width: box.width, height: box.height,
    points: count('circle.point'), optimal: count('circle.point.optimal'),
    front: count('path.front'), nights: count('circle.night'), trials: count('line.trials'),
    changepoints: count('line.changepoint'), bands: count('rect.band'),
    regressions: count('circle.regression'), lines: count('path.series-line'),
    smallestMark: minBox('circle'), smallestText: minBox('text.axis-label, text.tick'),
  };
});
"""


def _unavailable() -> str:
    """Why the browser test cannot run here, or ""."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        return f"{', '.join(missing)} not found (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return ""


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    """A headless Chromium with browser-log capture."""
    reason = _unavailable()
    if reason:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but the browser is unavailable: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


def test_html_report_loads_and_charts_render(driver: Any, tmp_path: Path) -> None:
    rows = [*sample_rows(), row(EVIL, "onnxruntime", "fp32", 1.0, 10, agreement=1.0)]
    report = build_report(
        "browser check " + EVIL,
        rows,
        verdicts=verdicts(),
        histories=[sample_history(), memory_history()],
    )
    page = tmp_path / "report.html"
    page.write_text(render(report, "html"), encoding="utf-8")

    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": WATCH_ERRORS})
    driver.get(page.as_uri())

    assert driver.title == "browser check " + EVIL  # the escaped title, read back as text
    assert driver.execute_script("return window.__reportErrors") == []
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    assert driver.execute_script("return document.querySelectorAll('script').length") == 0

    charts = driver.execute_script(MEASURE_CHARTS)
    plotted = [c for c in report.pareto if c.points]
    assert len(charts) == len(plotted) + len(report.histories)
    for chart in charts:
        assert chart["width"] > 100 and chart["height"] > 100, chart
        assert chart["smallestMark"] is not None and chart["smallestMark"] > 0, chart
        assert chart["smallestText"] is not None and chart["smallestText"] > 0, chart

    paretos = [c for c in charts if c["kind"] == "pareto"]
    for drawn, model in zip(paretos, plotted, strict=True):
        assert drawn["points"] == len(model.points), drawn
        assert drawn["optimal"] == len(model.front), drawn
        assert drawn["front"] == (1 if len(model.front) > 1 else 0), drawn

    histories = [c for c in charts if c["kind"] == "history"]
    for drawn, panel in zip(histories, report.histories, strict=True):
        history = panel.history
        assert drawn["nights"] == len(history.samples), drawn
        assert drawn["trials"] == sum(1 for s in history.samples if len(s.trials) > 1), drawn
        assert drawn["changepoints"] == len(history.change_points), drawn
        assert drawn["bands"] == (1 if history.baseline_band else 0), drawn
        assert drawn["lines"] == 1, drawn
    latency = next(c for c in histories if "latency_p50" in c["title"])
    assert latency["changepoints"] == 1 and latency["regressions"] == 1 and latency["bands"] == 1
