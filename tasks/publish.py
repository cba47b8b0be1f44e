"""Publish step: a recipe's checkpoint with its model card, to the local registry or the Hub.

The folder is staged in a temporary directory (checkpoint, README.md card, metrics.json, manifest
with sha256) and only then renamed into `<registry>/<model>/<recipe>/<version>/`, never over an
existing version. To the Hub it goes through huggingface_hub (private repo by default, one commit
that names the run); the token is read from the environment and written nowhere.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from quantgate.card import model_name, render_card
from quantgate.files import foreign_entries, manifest, slug, under, write_atomic, write_json
from quantgate.registry import add_version
from quantgate.results import Published
from quantgate.runlog import SHOWN
from quantgate.settings import PublishSettings

log = logging.getLogger("quantgate.publish")


class PublishError(RuntimeError):
    pass


def refusal(entry: dict, force: bool) -> str | None:
    """Why a recipe may not be published, or None."""
    verdict = entry.get("validate", {}).get("verdict")
    if verdict is None:
        return "not validated in this run"
    if (verdict == "fail" or entry.get("status") == "failed") and not force:
        return f"validation failed ({entry.get('reason', verdict)}); set steps.publish.force to publish anyway"
    return None


def linked_or_copied(src: str, dst: str) -> None:
    """A hard link where both sit on one filesystem: a 12B's checkpoints twice over filled the H100 machine's
    disk. Nothing writes a checkpoint's files in place afterwards (cards and records go by rename)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage(run_dir: Path, metrics: dict, recipe: str, into: Path, checkpoint_path: str, forced: bool) -> list[dict]:
    """Checkpoint, card, the recipe's metrics and a manifest in `into`; returns the manifest."""
    entry = metrics["recipes"][recipe]
    q = entry.get("quantize", {})
    # A given checkpoint is where it was fetched to; a recipe's is in the run.
    checkpoint = Path(q["checkpoint"]) if q.get("given") else run_dir / recipe / "checkpoint"
    if found := foreign_entries(checkpoint):  # a link would publish whatever file it points at
        raise PublishError(f"{checkpoint}: " + "; ".join(found))
    # symlinks=True: a link made after the check is copied as a link, which the manifest below refuses.
    shutil.copytree(checkpoint, into, symlinks=True, dirs_exist_ok=True, copy_function=linked_or_copied,
                    ignore=shutil.ignore_patterns(
        "README.md", "quantgate_metrics.json", "manifest.json"))  # a registry entry's own, when gated again
    card = render_card(run_dir, recipe, checkpoint_path, forced=forced)
    write_atomic(into / "README.md", card)
    write_atomic(run_dir / recipe / "card.md", card)
    spec = next(r for r in yaml.safe_load((run_dir / "config.yaml").read_text())["recipes"] if r["name"] == recipe)
    write_json(into / "quantgate_metrics.json", {"run_id": metrics["run_id"], "model": metrics["model"],
                                                 "reference": metrics["reference"], "recipe": recipe,
                                                 "recipe_spec": spec, "metrics": entry})
    files = manifest(into)
    write_json(into / "manifest.json", {"run_id": metrics["run_id"], "files": files})
    return files


def publish_local(run_dir: Path, metrics: dict, recipe: str, registry: Path, forced: bool) -> dict:
    # The card names the version folder, so a lost race restages under the next number (registry.add_version).
    target, files = add_version(under(registry, model_name(metrics), recipe),
                                lambda staging, target: stage(run_dir, metrics, recipe, staging, str(target), forced))
    return {"target": "local", "location": str(target), "version": target.name, "files": len(files),
            "bytes": sum(f["bytes"] for f in files)}


def hub_repo_id(template: str, metrics: dict, recipe: str) -> str:
    repo_id = template.format(model=model_name(metrics), recipe=recipe)
    org, _, name = repo_id.partition("/")
    slug(org), slug(name)  # the config checked the template; this checks what filled it
    return repo_id


def publish_hub(run_dir: Path, recipe: str, repo_template: str, private: bool, branch: str,
                endpoint: str | None, force: bool, dry_run: bool) -> dict:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    metrics = json.loads((run_dir / "metrics.json").read_text())
    repo_id = hub_repo_id(repo_template, metrics, recipe)
    message = f"quantgate run {metrics['run_id']}: {recipe} of {metrics['model'].get('base_model') or metrics['model']['source']}"
    with tempfile.TemporaryDirectory(prefix="quantgate-publish-") as tmp:
        files = stage(run_dir, metrics, recipe, Path(tmp), repo_id, forced=force)
        summary = {"target": "hub", "repo_id": repo_id, "branch": branch, "private": private, "commit_message": message,
                   "files": len(files), "bytes": sum(f["bytes"] for f in files)}
        if dry_run:
            log.info("publish (dry run): would upload %d files (%.3f GB) to %s@%s (%s): %s", len(files),
                     summary["bytes"] / 1e9, repo_id, branch, "private" if private else "public",
                     ", ".join(f["path"] for f in files))
            return {**summary, "dry_run": True, "location": None, "would_upload": [f["path"] for f in files]}
        token = os.environ.get("HF_TOKEN")
        if not token:
            raise PublishError("publishing to the Hub needs a token in the HF_TOKEN environment variable")
        api = HfApi(endpoint=endpoint, token=token)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if branch != "main":
                api.create_branch(repo_id, branch=branch, exist_ok=True)
            commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, revision=branch, commit_message=message)
        except HfHubHTTPError as e:
            status = e.response.status_code if e.response is not None else "no response"
            raise PublishError(f"the Hub ({api.endpoint}) refused the upload of {repo_id}@{branch}: HTTP {status}: "
                               f"{str(e).splitlines()[0]}") from None
    return {**summary, "location": commit.commit_url, "commit": commit.oid}


def publish(run_dir: str, recipe: str, settings: PublishSettings) -> Published:
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    entry = metrics["recipes"][recipe]
    if settings.target == "none":
        return Published(status="not_run", reason="publishing is off (steps.publish.target: none)")
    if why := refusal(entry, settings.force):
        return Published(status="failed", reason=f"refused: {why}")
    forced = entry.get("validate", {}).get("verdict") == "fail"
    if settings.target == "local":
        result = publish_local(run_dir, metrics, recipe, Path(settings.registry_dir), forced)
    else:
        result = publish_hub(run_dir, recipe, settings.hub_repo, settings.hub_private, settings.hub_branch,
                             settings.hub_endpoint, forced, settings.dry_run)
    log.info("published %s: %s", recipe, result.get("location") or "dry run", extra=SHOWN)
    return Published(status="ok", **result, **({"forced": True} if forced else {}))
