"""The nightly's alerts: the automations kept in configs/automations (a failed nightly, one that did not finish
within its window, a gate regression, a failed cell), created on the Prefect server by one command
(`quantgate alerts --webhook URL`), each notifying through one webhook block. Running it again replaces them."""
from __future__ import annotations

from pathlib import Path

import yaml
from prefect.automations import Automation
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client

from quantgate.paths import PROJECT_ROOT

AUTOMATIONS = PROJECT_ROOT / "configs" / "automations"
BLOCK = "quantgate-alerts"
LATE = "quantgate: nightly did not finish"


def load(folder: Path, block_id, nightly_window_s: int | None) -> list[Automation]:
    """The folder's automations, their notifications sent through the block; the late-nightly window set."""
    found = []
    for path in sorted(folder.glob("*.yaml")):
        spec = yaml.safe_load(path.read_text())
        for action in spec.get("actions", []):
            if action["type"] == "send-notification":
                action["block_document_id"] = str(block_id)
        if spec["name"] == LATE and nightly_window_s is not None:
            spec["trigger"]["within"] = nightly_window_s
        try:
            found.append(Automation.model_validate(spec))
        except ValueError as e:
            raise ValueError(f"{path}: not an automation Prefect takes: {e}") from None
    return found


def install(webhook_url: str, nightly_window_s: int | None = None, folder: Path = AUTOMATIONS) -> list[str]:
    """The webhook block saved and the folder's automations created on the server, replacing those of the same
    names; their names."""
    # The URL is a secret (a Slack webhook's is its credential): kept in the block's secrets, shown masked in the UI.
    block = CustomWebhookNotificationBlock(name=BLOCK, url="{{webhook}}", secrets={"webhook": webhook_url},
                                           json_data={"text": "{{subject}}\n{{body}}"})  # Slack's, Teams', Mattermost's
    automations = load(folder, block.save(BLOCK, overwrite=True), nightly_window_s)
    with get_client(sync_client=True) as client:
        for automation in automations:
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
    for automation in automations:
        automation.create()
    return [a.name for a in automations]
