"""The report, the cards and the figure, rendered again from the golden run record alone; names and descriptions
from a model folder or a recipe are text in everything a person reads."""
import json
import re

import yaml

from quantgate import cli
from quantgate.card import render_card
from quantgate.report import summary_header


def test_the_report_renders_again_from_the_record(golden_run):
    metrics = json.loads((golden_run / "metrics.json").read_text())
    (golden_run / "report.md").unlink(missing_ok=True)
    assert cli.main(["report", str(golden_run)]) == 0
    report = (golden_run / "report.md").read_text()
    assert "| " + " | ".join(summary_header()) + " |" in report
    for name, entry in metrics["recipes"].items():
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} | "))
        assert f"| {entry['status']} |" in row, row
        if "kl_mean" in entry.get("validate", {}):
            assert f"| {entry['validate']['kl_mean']:.4f} |" in row
    assert (golden_run / "summary.png").stat().st_size > 10_000
    nf4 = metrics["recipes"]["bnb-nf4"]
    card = (golden_run / "bnb-nf4" / "card.md").read_text()
    assert f"| bnb-nf4 | {nf4['evaluate']['mmlu']['acc']:.4f} | {nf4['evaluate']['mmlu']['delta_acc']:+.4f}" in card
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_partial_record_is_a_one_line_refusal(golden_run, capsys):
    metrics = golden_run / "metrics.json"
    metrics.write_text(metrics.read_text()[:200])  # cut short
    assert cli.main(["report", str(golden_run)]) == 2
    assert "not a complete run record (JSONDecodeError" in capsys.readouterr().err
    metrics.write_text(json.dumps({"run_id": "x", "status": "running", "recipes": {}}))  # never got far
    assert cli.main(["report", str(golden_run)]) == 2


def prose(markdown: str) -> str:
    """What a Markdown renderer renders as markup: the text without the card's YAML front matter (metadata the Hub
    reads, not renders) and without fenced code blocks (shown as they are)."""
    body = markdown.split("---\n", 2)[2] if markdown.startswith("---\n") else markdown
    body = re.sub(r"```.*?```", "", body, flags=re.S)
    return re.sub(r"(?<![\\`])(`+)(?!`).*?(?<!`)\1(?!`)", "", body)  # code spans (not an escaped backtick)


HOSTILE = "/models/`tick <img src=x onerror=alert(1)> $\\x$ [link](http://x)"


def test_names_and_descriptions_are_text_in_the_report_card_and_figure(golden_run):
    metrics = json.loads((golden_run / "metrics.json").read_text())
    metrics["model"].update(source=HOSTILE, base_model=None)
    (golden_run / "metrics.json").write_text(json.dumps(metrics))
    config = yaml.safe_load((golden_run / "config.yaml").read_text())
    config["recipes"][0]["description"] = "<script>alert(1)</script> ``` fenced"
    (golden_run / "config.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["report", str(golden_run)]) == 0
    name = config["recipes"][0]["name"]
    for text in (prose((golden_run / "report.md").read_text()), prose((golden_run / name / "card.md").read_text())):
        unescaped = [m for m in ("<img", "<script>", "](http://x)", "$", "`tick")
                     if re.search(r"(?<!\\)" + re.escape(m), text)]  # each must be preceded by a backslash
        assert unescaped == [], unescaped
    card = (golden_run / name / "card.md").read_text()
    assert "\\<script\\>alert(1)\\</script\\>" in card
    assert card.count("```") % 2 == 0  # the description cannot close the recipe's code block
    assert "- model: `` /models/`tick <img src=x onerror=alert(1)> $\\x$ [link](http://x) `` (" in \
        (golden_run / "report.md").read_text()  # a code span, fenced past the name's own backtick: shown as it is
    assert (golden_run / "summary.png").stat().st_size > 10_000  # the title is text, not mathtext


def test_the_card_says_what_did_not_run(golden_run):
    metrics = json.loads((golden_run / "metrics.json").read_text())
    failed = next(n for n, e in metrics["recipes"].items() if e["status"] != "passed" and "quantize" in e)
    card = render_card(golden_run, failed)
    assert "Not measured in this run (" in card


def test_a_stored_tensor_finding_shows_in_the_report_and_card(golden_run):
    """What the stored-tensor scan found, planted in the golden record as validate records it: the report's table
    says which findings fail the recipe, and the card names the first."""
    from quantgate.report import render_report
    from quantgate.stored import finding_reason

    metrics = json.loads((golden_run / "metrics.json").read_text())
    scanned = {"scanned": True, "quantized_modules": 210, "seconds": 0.5,
               "findings": [{"module": "model.layers.1.self_attn.q_proj", "tensor": "weight_scale_inv",
                             "problem": "NaN or Inf", "count": 2}],
               "notes": [{"module": "model.layers.3.mlp.up_proj", "tensor": "weight", "problem": "all-zero blocks",
                          "count": 1}]}
    reason = finding_reason(scanned)
    assert reason == "model.layers.1.self_attn.q_proj's stored weight_scale_inv: 2 NaN or Inf values, before any forward"
    metrics["recipes"]["fp8-block64"]["validate"] = {"verdict": "fail", "reasons": [reason], "stored": scanned}
    report = render_report(metrics)
    assert "## fp8-block64: stored tensors" in report
    assert "| `model.layers.1.self_attn.q_proj` | `weight_scale_inv` | NaN or Inf | 2 | yes |" in report
    assert "| `model.layers.3.mlp.up_proj` | `weight` | all-zero blocks | 1 | no |" in report
    (golden_run / "metrics.json").write_text(json.dumps(metrics))
    card = render_card(golden_run, "fp8-block64")
    assert "- `model.layers.1.self_attn.q_proj`'s `weight_scale_inv`: 2 × NaN or Inf" in card
