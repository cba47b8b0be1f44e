"""Where a run's time went: each step's span from the run's record, and the figure drawn from them."""
import json

from quantgate import cli
from quantgate.timeline import ALONE, WAITING, Span, plot_timeline, spans, time_to_verdict


def record() -> dict:
    """A record as a run of one recipe writes it: the reference's benchmark waited 4 s and timed 5 s alone; the recipe
    failed validate, so its later steps have no span."""
    return {"run_id": "r", "started_at": "2026-12-08T10:00:00+00:00", "finished_at": "2026-12-08T10:01:40+00:00",
            "model": {"source": "/m", "download": {"status": "ok", "seconds": 2.0,
                                                   "started_at": "2026-12-08T10:00:00.500+00:00"}},
            "reference": {"status": "ok", "seconds": 30.0, "started_at": "2026-12-08T10:00:03+00:00",
                          "benchmark": {"status": "ok", "seconds": 40.0, "started_at": "2026-12-08T10:00:33+00:00",
                                        "alone": {"started_at": "2026-12-08T10:01:05+00:00", "waited_s": 4.0,
                                                  "seconds": 5.0}}},
            "recipes": {"nf4": {"status": "failed", "steps": {
                "quantize": {"status": "ok", "seconds": 10.0, "started_at": "2026-12-08T10:00:03+00:00"},
                "validate": {"status": "failed", "seconds": 20.0, "started_at": "2026-12-08T10:00:33+00:00"},
                "evaluate": {"status": "skipped", "reason": "validate did not pass"}}}}}


def test_each_step_spans_from_the_records_start_and_a_step_not_run_has_none():
    found = spans(record())
    assert Span("model", "download", 0.5, 2.0) in found
    assert Span("model", "benchmark", 33.0, 40.0) in found
    assert Span("model", WAITING, 61.0, 4.0) in found and Span("model", ALONE, 65.0, 5.0) in found
    assert Span("nf4", "validate", 33.0, 20.0, "failed") in found
    assert not [s for s in found if s.label == "evaluate"]
    assert time_to_verdict(record()) == 100.0
    assert time_to_verdict({**record(), "finished_at": None}) is None


def test_the_figure_is_drawn_where_any_step_has_a_span(tmp_path):
    assert plot_timeline(record(), tmp_path / "timeline.png").stat().st_size > 10_000
    empty = {**record(), "model": {"source": "/m"}, "reference": {}, "recipes": {}}
    assert plot_timeline(empty, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_the_report_shows_the_timeline_and_when_the_verdict_came(golden_run):
    metrics = json.loads((golden_run / "metrics.json").read_text())
    assert cli.main(["report", str(golden_run)]) == 0  # the golden record is older than the steps' start times
    assert "timeline.png" not in (golden_run / "report.md").read_text()
    metrics["recipes"]["bnb-nf4"]["steps"]["quantize"]["started_at"] = "2026-12-05T08:28:00+00:00"
    (golden_run / "metrics.json").write_text(json.dumps(metrics))
    assert cli.main(["report", str(golden_run)]) == 0
    report = (golden_run / "report.md").read_text()
    assert f"The verdict came {time_to_verdict(metrics):.0f} s after the run's start." in report
    assert "![Each step's span from the run's start](timeline.png)" in report
    assert (golden_run / "timeline.png").stat().st_size > 10_000
