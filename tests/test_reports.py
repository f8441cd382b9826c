"""What a person reads after `mofe evaluate`: the short summary it prints and the HTML page
that the Kubeflow UI shows (results.md's table as an HTML table, plots inline)."""

import json
import re
from html.parser import HTMLParser

from mofe_ood import cli, evaluate, report


class Cells(HTMLParser):
    """The text of each table row of a page, and whatever stands outside tables."""

    def __init__(self):
        super().__init__()
        self.rows, self.outside, self.depth = [], [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.depth += 1
        elif tag == "tr":
            self.rows.append([])

    def handle_endtag(self, tag):
        if tag == "table":
            self.depth -= 1

    def handle_data(self, data):
        if self.depth and data.strip():
            self.rows[-1].append(data.strip())
        elif data.strip():
            self.outside.append(data.strip())


def test_plots_page_shows_results_as_an_html_table(tiny_project):
    reports = tiny_project / "reports"
    markdown_rows = [line for line in (reports / "results.md").read_text().splitlines()
                     if line.startswith("|") and not line.startswith("|---")]
    page = Cells()
    page.feed(report.plots_html(reports))
    assert len(page.rows) == len(markdown_rows) > 2
    assert page.rows[0][:2] == ["variant", "score"]
    first = [re.sub(r"\*\*(.+?)\*\*", r"\1", c).strip() for c in markdown_rows[1].strip("|").split("|")]
    assert page.rows[1] == first  # bold marks became <b>, not text
    assert not any("|" in text or "**" in text for text in page.outside + sum(page.rows, []))


def test_evaluate_prints_one_line_per_variant_not_the_metrics(tiny_project, tiny_params, capsys, monkeypatch):
    monkeypatch.chdir(tiny_project)
    metrics = json.loads((tiny_project / "reports" / "metrics.json").read_text())
    lines = evaluate.summary(metrics, tiny_params).splitlines()
    assert len(lines) == len(metrics) + 2 and all(len(line) < 100 for line in lines)
    thresholds = json.loads((tiny_project / "reports" / "thresholds.json").read_text())
    for variant, line in zip(metrics, lines[1:-1], strict=True):
        default = thresholds[variant]["score"]  # chosen on validation
        near = metrics[variant][default]["near"]["auroc"]
        assert line.split()[:2] == [variant, default] and f"{100 * near:.1f}" in line.split()
    # The CLI prints that summary (the stage itself is not re-run: the fixture is shared).
    monkeypatch.setattr(evaluate, "run", lambda params: metrics)
    assert cli.main(["evaluate"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == "\n".join(lines) and len(printed) < 100 * len(lines)


def test_dashboard_names_the_best_baseline_on_validation_not_on_test():
    # b/energy wins on test (0.90) but a/knn on validation (0.80 vs 0.60): the dashboard must show
    # a/knn, with a/knn's test numbers, as every other choice reads validation only.
    def entry(near):
        return {"near": {"auroc": near, "fpr95": 1 - near}, "far": {"auroc": 0.95, "fpr95": 0.2}}

    test = {"ours": {"id_accuracy": 0.9, "knn": entry(0.7)},
            "a": {"id_accuracy": 0.8, "knn": entry(0.75), "energy": entry(0.5)},
            "b": {"id_accuracy": 0.85, "knn": entry(0.6), "energy": entry(0.9)}}
    val = {"ours": {"knn": {"selection": 0.99}},
           "a": {"id_accuracy": 0.8, "knn": {"selection": 0.80}, "energy": {"selection": 0.5}},
           "b": {"knn": {"selection": 0.55}, "energy": {"selection": 0.60}}}
    thresholds = {v: {"score": "knn"} for v in test}
    shown = report.dashboard(test, val, thresholds, "ours")
    assert shown["best_baseline/name"] == "a/knn"
    assert shown["best_baseline/near_auroc"] == 0.75 and shown["best_baseline/id_accuracy"] == 0.8
    assert shown["ours/near_auroc"] == 0.7 and shown["ours/far_fpr95"] == 0.2
