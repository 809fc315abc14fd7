"""The HTML report in a real headless browser: offline, sortable, filterable, marked, safe.

Debian's Chromium (``apt-get install -y chromium``) driven by Playwright for Python
(``pip install playwright``; its own browser download is never used). Without them these tests
skip with the reason, except under CI (``CI=true``), which installs them: there they fail.
``MLLM_METRICS_CHROMIUM`` may name another Chromium executable.

Every expected order and set is computed here from the records the test wrote (sorted or
filtered in Python by the rule the page states), never read back from the page's code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from mllm_metrics.report import report_main

# Debian's Chromium; MLLM_METRICS_CHROMIUM names another build of it (e.g. on macOS).
CHROMIUM = (
    os.environ.get("MLLM_METRICS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
)
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


def _missing() -> str | None:
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append("Chromium is not installed (apt-get install -y chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("Playwright is not installed (pip install playwright)")
    return "; ".join(missing) or None


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true, where the browser tests must run, but {missing}")
        pytest.skip(f"the browser tests need Chromium and Playwright: {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


class Page:
    """A page of the report, every request other than the file itself blocked and recorded."""

    def __init__(self, browser, path: Path) -> None:
        self.url = path.as_uri()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.route(
            "**/*",
            lambda route: route.continue_() if route.request.url == self.url else route.abort(),
        )
        self.page.goto(self.url)
        self.page.wait_for_selector("body[data-ready=true]", timeout=20_000)

    def shown(self, table: str = "samples") -> list[int]:
        """The index of each row the table shows, top to bottom."""
        cells = self.page.locator(f"#{table} tbody tr[data-index]")
        return [
            int(value) for value in cells.evaluate_all("rows => rows.map(r => r.dataset.index)")
        ]

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()

    def close(self) -> None:
        self.context.close()


def _evaluation(step_seed: int, references: list[str], groups: list[str]) -> list[dict]:
    """Realistic records: 8-bit answers with a few wrong bits, the NLL growing with them."""
    rng = random.Random(step_seed)
    records = []
    for index, (reference, group) in enumerate(zip(references, groups)):
        prediction = "".join(bit if rng.random() > 0.06 else "10"[int(bit)] for bit in reference)
        correct = sum(a == b for a, b in zip(prediction, reference))
        generated = prediction if rng.random() > 0.2 else reference
        records.append(
            {
                "index": index,
                "supervised_tokens": len(reference),
                "correct_tokens": correct,
                "exact": correct == len(reference),
                "nll": round((8 - correct) * 1.5 + rng.random(), 6),
                "group": group,
                "prediction": prediction,
                "reference": reference,
                "gen_exact": generated == reference,
                "generated": generated,
            }
        )
    return records


def _special(records: list[dict]) -> list[dict]:
    """Hand-made samples after the generated ones: marks to check, a script, no token."""
    n = len(records)

    def sample(index, prediction, reference, supervised, correct, exact, nll, group="alpha"):
        return {
            "index": index,
            "supervised_tokens": supervised,
            "correct_tokens": correct,
            "exact": exact,
            "nll": nll,
            "group": group,
            "prediction": prediction,
            "reference": reference,
            "gen_exact": None,
            "generated": None,
        }

    return [
        *records,
        # "0110x" against "0100": the third character wrong, the fifth extra.
        sample(n, "0110x", "0100", 4, 3, False, 9.5),
        # "01" against "0110": the last two reference characters missing.
        sample(n + 1, "01", "0110", 4, 2, False, 9.6),
        sample(n + 2, XSS, XSS, 2, 2, True, 9.7, group="<i>xss</i>"),
        sample(n + 3, "", "", 0, 0, None, 0.0),  # no supervised token: no share
    ]


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("records")
    rng = random.Random(0)
    references = ["".join(rng.choice("01") for _ in range(8)) for _ in range(250)]
    groups = ["beta" if index % 3 == 0 else "alpha" for index in range(250)]
    by_step = {step: _special(_evaluation(step, references, groups)) for step in (100, 200)}
    for step, records in by_step.items():
        text = "".join(json.dumps(record) + "\n" for record in records)
        (directory / f"val_step{step:07d}.jsonl").write_text(text)
    return directory, by_step


@pytest.fixture(scope="module")
def page_file(records_dir, tmp_path_factory):
    directory, _ = records_dir
    out = tmp_path_factory.mktemp("page") / "report.html"
    assert report_main([str(directory), "--no-plot", "--html", str(out)]) == 0
    return out


@pytest.fixture
def page(browser, page_file):
    page = Page(browser, page_file)
    yield page
    page.close()


def _all_rows(page: Page) -> None:
    page.page.select_option("#page-size", "500")


def test_page_loads_offline_without_errors(page, records_dir):
    _, by_step = records_dir
    assert page.requests == [page.url]  # nothing but the file itself, not even attempted
    assert page.errors == []
    total = len(by_step[200])
    # Starts on the last evaluation, 100 rows a page, sorted by index.
    assert page.text("#count") == f"Showing 1–100 of {total} matching samples ({total} at step 200)"
    assert page.shown() == list(range(100))
    # The curves: one chart per metric (bit-match, exact-match, generated, NLL), inline SVG.
    assert page.page.locator("svg.chart").count() == 4


def test_sorting_by_a_column_orders_the_rows(page, records_dir):
    _, by_step = records_dir
    records = by_step[200]
    _all_rows(page)
    page.page.click("#samples th[data-key=nll] button")
    assert page.shown() == [
        r["index"] for r in sorted(records, key=lambda r: (r["nll"], r["index"]))
    ]
    page.page.click("#samples th[data-key=nll] button")  # again: descending, ties still by index
    assert page.shown() == [
        r["index"] for r in sorted(records, key=lambda r: (-r["nll"], r["index"]))
    ]
    # Share: correct / supervised; the sample without supervised tokens has none: last, both ways.
    scored = [r for r in records if r["supervised_tokens"]]
    no_share = [r["index"] for r in records if not r["supervised_tokens"]]
    assert len(no_share) == 1

    def share(r):
        return r["correct_tokens"] / r["supervised_tokens"]

    page.page.click("#samples th[data-key=share] button")
    ascending = [r["index"] for r in sorted(scored, key=lambda r: (share(r), r["index"]))]
    assert page.shown() == ascending + no_share
    page.page.click("#samples th[data-key=share] button")
    descending = [r["index"] for r in sorted(scored, key=lambda r: (-share(r), r["index"]))]
    assert page.shown() == descending + no_share
    assert (
        page.page.locator("#samples th[data-key=share]").get_attribute("aria-sort") == "descending"
    )


def test_filters_change_the_rows_to_exactly_the_expected_set(page, records_dir):
    _, by_step = records_dir
    records = by_step[200]
    _all_rows(page)
    page.page.select_option("#group", "beta")
    beta = [r["index"] for r in records if r["group"] == "beta"]
    assert page.shown() == beta and len(beta) == 84  # 0, 3, ..., 249
    page.page.select_option("#status", "wrong")
    beta_wrong = [r["index"] for r in records if r["group"] == "beta" and r["exact"] is False]
    assert page.shown() == beta_wrong and 0 < len(beta_wrong) < len(beta)
    assert page.text("#count").startswith(f"Showing 1–{len(beta_wrong)} of {len(beta_wrong)} ")
    page.page.select_option("#group", "")
    # Wrong: exact false; the sample without a supervised token (exact null) is neither.
    assert page.shown() == [r["index"] for r in records if r["exact"] is False]
    page.page.select_option("#status", "right")
    assert page.shown() == [r["index"] for r in records if r["exact"] is True]
    page.page.select_option("#status", "none")
    assert page.shown() == [len(records) - 1]
    page.page.select_option("#status", "gen-differs")
    differs = [
        r["index"]
        for r in records
        if r["gen_exact"] is not None and r["exact"] is not None and r["gen_exact"] != r["exact"]
    ]
    assert page.shown() == differs and differs
    page.page.select_option("#status", "all")
    page.page.fill("#search", "0110")  # in a prediction, reference or generated text
    texts = ("prediction", "reference", "generated")
    found = [r["index"] for r in records if any("0110" in (r[k] or "") for k in texts)]
    assert page.shown() == found and 0 < len(found) < len(records)
    page.page.fill("#search", "17")  # no text holds a 7: index 17 only
    assert page.shown() == [17]
    page.page.fill("#search", "no such text")
    assert page.shown() == [] and "No sample matches" in page.text("#samples tbody")


def _nodes(page: Page, index: int, column: str) -> list[list[str]]:
    cell = page.page.locator(f"#samples tr[data-index='{index}'] td[data-col={column}] > span")
    return cell.evaluate(
        "span => Array.from(span.childNodes).map(n => [n.nodeName, n.className || '', "
        "n.textContent])"
    )


def test_wrong_characters_are_marked(page, records_dir):
    _, by_step = records_dir
    n = len(by_step[200]) - 4  # the first hand-made sample
    page.page.fill("#search", str(n))
    # "0110x" against "0100": 0 and 1 right, 1 for 0 wrong, 0 right, x past the end.
    assert _nodes(page, n, "prediction") == [
        ["#text", "", "01"],
        ["MARK", "bad", "1"],
        ["#text", "", "0"],
        ["MARK", "extra", "x"],
    ]
    hint = page.page.locator(f"tr[data-index='{n}'] mark.bad").get_attribute("title")
    assert hint == 'position 3: expected "0"'
    page.page.fill("#search", str(n + 1))
    # "01" against "0110": the reference's 1 and 0 are missing.
    assert _nodes(page, n + 1, "prediction") == [
        ["#text", "", "01"],
        ["MARK", "missing", "1"],
        ["MARK", "missing", "0"],
    ]
    # A right sample has no mark.
    right = next(r for r in by_step[200] if r["exact"])
    page.page.fill("#search", str(right["index"]))
    assert _nodes(page, right["index"], "prediction") == [["#text", "", right["reference"]]]


def test_a_script_in_a_prediction_is_shown_as_text(page, records_dir):
    _, by_step = records_dir
    n = len(by_step[200]) - 2
    page.page.fill("#search", str(n))
    row = page.page.locator(f"#samples tr[data-index='{n}']")
    assert row.locator("td[data-col=prediction]").inner_text() == XSS
    assert row.locator("td[data-col=reference]").inner_text() == XSS
    assert row.locator("td[data-col=group]").inner_text() == "<i>xss</i>"
    # The group's name is text in the filter, the legend and the summary table too.
    assert "<i>xss</i>" in page.page.locator("#group").inner_text()
    assert "<i>xss</i>" in page.text(".legend") and "<i>xss</i>" in page.text("table.summary")
    assert page.page.locator("body img, body i, #samples script").count() == 0
    assert page.page.evaluate("window.__xss") is None
    assert page.requests == [page.url] and page.errors == []


def test_flips_between_two_evaluations(page, records_dir):
    _, by_step = records_dir
    before, after = by_step[100], by_step[200]
    lost = [b["index"] for a, b in zip(before, after) if a["exact"] is True and b["exact"] is False]
    gained = [
        b["index"] for a, b in zip(before, after) if a["exact"] is False and b["exact"] is True
    ]
    assert lost and gained
    # By default: the last two evaluations, step 100 -> step 200.
    assert page.page.locator("#flip-from option:checked").inner_text() == "step 100"
    assert page.page.locator("#flip-to option:checked").inner_text() == "step 200"
    assert page.shown("lost") == lost
    assert page.shown("gained") == gained
    assert page.text("#flip-counts") == (
        f"right → wrong: {len(lost)} · wrong → right: {len(gained)}"
    )
    # The other way round, the lists swap.
    page.page.select_option("#flip-from", "1")
    page.page.select_option("#flip-to", "0")
    assert page.shown("lost") == gained and page.shown("gained") == lost


def test_a_large_eval_set_is_shown_page_by_page(browser, tmp_path):
    records = [
        {
            "index": index,
            "supervised_tokens": 5,
            "correct_tokens": index % 6 if index % 6 < 5 else 5,
            "exact": index % 6 == 5,
            "nll": float(index % 7),
            "prediction": format(index % 32, "05b"),
            "reference": "00000",
        }
        for index in range(5000)
    ]
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    text = "".join(json.dumps(record) + "\n" for record in records)
    (records_dir / "eval_step0000001.jsonl").write_text(text)
    out = tmp_path / "big.html"
    assert report_main([str(records_dir), "--no-plot", "--html", str(out)]) == 0
    page = Page(browser, out)
    try:
        assert page.errors == [] and page.requests == [page.url]
        assert page.text("#count") == ("Showing 1–100 of 5,000 matching samples (5,000 at step 1)")
        assert page.shown() == list(range(100))
        page.page.click("#next")
        assert page.shown() == list(range(100, 200))
        assert page.text("#page") == "page 2 of 50"
        page.page.select_option("#status", "right")  # exact: index % 6 == 5
        right = [index for index in range(5000) if index % 6 == 5]
        assert page.text("#count").endswith(f"of {len(right):,} matching samples (5,000 at step 1)")
        assert page.shown() == right[:100]
    finally:
        page.close()


def test_evaluations_of_two_runs_are_not_compared(browser, tmp_path, records_dir):
    _, by_step = records_dir
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    for name, records, mtime in (
        ("val_step0000100.jsonl", by_step[100], 100.0),
        ("val_step0000200.jsonl", by_step[200], 200.0),
        ("val_step0000200-2.jsonl", by_step[100], 300.0),  # step 200 again
    ):
        path = records_dir / name
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
        os.utime(path, (mtime, mtime))
    out = tmp_path / "runs.html"
    assert report_main([str(records_dir), "--no-plot", "--html", str(out)]) == 0
    page = Page(browser, out)
    try:
        assert page.errors == []
        assert "run 2 starts with step 200 again" in page.text(".warn")
        # Default: run 1's two evaluations (run 2 has one).
        assert page.page.locator("#flip-from option:checked").inner_text() == "step 100"
        assert page.page.locator("#flip-to option:checked").inner_text() == "step 200"
        assert page.shown("lost")
        page.page.select_option("#flip-from", "1")  # step 200 (run 1)
        page.page.select_option("#flip-to", "2")  # step 200 #2 (run 2)
        assert page.text("#flip-note").startswith(
            "Not comparable: step 200 is of run 1 and step 200 #2 of run 2."
        )
        assert page.shown("lost") == [] and page.shown("gained") == []
        assert page.text("#flip-counts") == ""
    finally:
        page.close()
