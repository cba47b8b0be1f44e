"""The run's Prefect artifacts: its report, a table of every recipe's metrics, each recipe's table and card, the links,
under keys that stay the same across runs, so the UI shows each one's history."""
from __future__ import annotations

import json
import re
from pathlib import Path

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from quantgate.card import model_name
from quantgate.report import summary_header, summary_rows


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes; stable per model and recipe."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")


def create_artifacts(run_dir: Path) -> list[str]:
    """The run's report, a table of every recipe's metrics, each recipe's card and the links, as
    Prefect artifacts whose keys stay the same across runs (the UI shows each one's history)."""
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    model = model_name(metrics)
    keys = [artifact_key("quantgate", model, "report"), artifact_key("quantgate", model, "metrics"),
            artifact_key("quantgate", model, "run-dir")]
    create_markdown_artifact(markdown=(run_dir / "report.md").read_text(), key=keys[0],
                             description=f"run {metrics['run_id']}: {metrics['status']}")
    create_table_artifact(table=[dict(zip(summary_header(), row)) for row in summary_rows(metrics)], key=keys[1],
                          description=f"run {metrics['run_id']}")
    create_link_artifact(link=run_dir.resolve().as_uri(), link_text=str(run_dir), key=keys[2],
                         description=f"run directory of {metrics['run_id']}")
    rows = {row[0]: dict(zip(summary_header(), row)) for row in summary_rows(metrics)}
    for recipe, entry in metrics["recipes"].items():
        keys.append(artifact_key("quantgate", model, recipe, "metrics"))  # the recipe beside the reference, per run
        create_table_artifact(table=[rows["reference"], rows[recipe]], key=keys[-1],
                              description=f"run {metrics['run_id']}: {entry['status']}")
        card = run_dir / recipe / "card.md"
        if card.is_file():
            keys.append(artifact_key("quantgate", model, recipe, "card"))
            create_markdown_artifact(markdown=card.read_text(), key=keys[-1], description=f"run {metrics['run_id']}")
        location = entry.get("publish", {}).get("location")
        if location:
            keys.append(artifact_key("quantgate", model, recipe, "published"))
            link = location if "://" in location else Path(location).as_uri()
            create_link_artifact(link=link, link_text=location, key=keys[-1], description=f"run {metrics['run_id']}")
    return keys
