"""Publish step: the card of the default run, the local registry, the Hub through a local endpoint,
and the token kept out of everything the run writes."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tasks.publish import PublishError, publish, publish_hub
from tests.conftest import PROJECT, QUICK
from tests.fake_hub import FakeHub

FAKE_TOKEN = "hf_quantgateTESTtoken0123456789abcdefXYZ"


@pytest.fixture
def hub():
    server = FakeHub()
    yield server
    server.close()


def settings(**changes):
    from quantgate.settings import PublishSettings

    return PublishSettings(**changes)


def test_default_run_publishes_to_the_registry(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    published = metrics["recipes"]["bnb-nf4"]["publish"]
    assert metrics["recipes"]["bnb-nf4"]["steps"]["publish"]["status"] == "ok"
    location = Path(published["location"])
    assert location.name == "v1" and location.parent.name == "bnb-nf4"
    manifest = json.loads((location / "manifest.json").read_text())
    names = {f["path"] for f in manifest["files"]}
    assert {"README.md", "model.safetensors", "config.json", "quantgate_metrics.json"} <= names
    assert manifest["run_id"] == metrics["run_id"] and published["files"] == len(manifest["files"])
    assert (location / "README.md").read_text() == (run_dir / "bnb-nf4" / "card.md").read_text()
    assert not list(location.parent.glob(".staging-*"))
    # On one filesystem the weights are the run's own file, linked: a 12B's checkpoint is not held twice.
    run_weights = run_dir / "bnb-nf4" / "checkpoint" / "model.safetensors"
    assert (location / "model.safetensors").stat().st_ino == run_weights.stat().st_ino
    assert run_weights.stat().st_nlink >= 2


def test_a_second_publish_makes_a_new_version_and_a_failing_recipe_is_refused(run_dir):
    registry = json.loads((run_dir / "metrics.json").read_text())["recipes"]["bnb-nf4"]["publish"]["location"]
    registry = Path(registry).parents[2]
    again = publish(str(run_dir), "bnb-nf4", settings(registry_dir=str(registry))).model_dump()
    assert again["status"] == "ok" and again["version"] == "v2"
    assert (Path(again["location"]).parent / "v1" / "manifest.json").is_file()  # v1 untouched
    refused = publish(str(run_dir), "int8-strict", settings(registry_dir=str(registry))).model_dump()
    assert refused["status"] == "failed" and refused["reason"].startswith("refused: validation failed")
    assert not (registry / "SmolLM2-135M-Instruct" / "int8-strict").exists()
    forced = publish(str(run_dir), "int8-strict", settings(registry_dir=str(registry), force=True)).model_dump()
    assert forced["status"] == "ok" and forced["forced"]
    card = (Path(forced["location"]) / "README.md").read_text()
    first_line_after_front_matter = card.split("---\n", 2)[2].splitlines()[0]
    assert "FAILED quantgate's checks" in first_line_after_front_matter


def test_card_parses_carries_the_run_numbers_and_its_snippet_runs(run_dir):
    metrics = json.loads((run_dir / "metrics.json").read_text())
    entry, ref = metrics["recipes"]["bnb-nf4"], metrics["reference"]
    card = (run_dir / "bnb-nf4" / "card.md").read_text()
    _, front, body = card.split("---\n", 2)
    front = yaml.safe_load(front)
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and front["license"] == "apache-2.0"
    assert front["library_name"] == "transformers" and "quantgate" in front["tags"]
    mmlu = entry["evaluate"]["mmlu"]
    assert f"| bnb-nf4 | {mmlu['acc']:.4f} | {mmlu['delta_acc']:+.4f} [{mmlu['delta_ci95'][0]:+.4f}" in body
    assert f"| reference | {ref['evaluate']['mmlu']['acc']:.4f} |" in body
    assert f"| {entry['validate']['verdict']} | {entry['validate']['kl_mean']:.4f} |" in body
    assert f"{entry['benchmark']['latency']['decode_ms_per_token']:.2f}" in body
    assert metrics["run_id"] in body
    snippet = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    code = snippet + "\nids = tokenizer('The capital of France is', return_tensors='pt')\n" \
                     "print(tokenizer.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0]))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=PROJECT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("The capital of France is")


def test_report_command_renders_again(run_dir, tmp_path):
    import shutil

    from quantgate.cli import main

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoint"))
    (copy / "report.md").unlink()
    (copy / "bnb-nf4" / "card.md").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (run_dir / "report.md").read_text()
    assert "![MMLU delta against memory and speed](summary.png)" in (copy / "report.md").read_text()
    assert (copy / "summary.png").stat().st_size > 10_000
    assert "## Evaluation" in (copy / "bnb-nf4" / "card.md").read_text()


def test_hub_upload_through_a_local_endpoint(run_dir, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    result = publish_hub(run_dir, "bnb-nf4", "quantgate-test/{model}-{recipe}", private=True, branch="nightly",
                         endpoint=hub.endpoint, force=False, dry_run=False)
    create = next(r for r in hub.requests if r["path"] == "/api/repos/create")
    spec = json.loads(create["body"])
    assert spec["visibility"] == "private" and spec["name"] == "SmolLM2-135M-Instruct-bnb-nf4"
    assert spec["organization"] == "quantgate-test"
    assert all(r["headers"].get("authorization") == f"Bearer {FAKE_TOKEN}" for r in hub.requests)
    # huggingface_hub splits a large folder into several commits; each names the run.
    assert {(c["repo"], c["revision"]) for c in hub.commits} == {("quantgate-test/SmolLM2-135M-Instruct-bnb-nf4",
                                                                   "nightly")}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert hub.commits[0]["header"]["summary"] == result["commit_message"]
    assert all(c["header"]["summary"].startswith(result["commit_message"]) for c in hub.commits)
    assert metrics["run_id"] in result["commit_message"]
    commit = {"files": {name: data for c in hub.commits for name, data in c["files"].items()}}
    manifest = json.loads(commit["files"]["manifest.json"])
    assert set(commit["files"]) == {f["path"] for f in manifest["files"]} | {"manifest.json"}
    checkpoint = run_dir / "bnb-nf4" / "checkpoint"
    assert commit["files"]["model.safetensors"] == (checkpoint / "model.safetensors").read_bytes()
    assert commit["files"]["README.md"].decode().startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct")
    assert result["location"].endswith("/commit/abc123")
    assert hub.validated and hub.validated[0] == commit["files"]["README.md"].decode()  # front matter the Hub accepts


def test_hub_error_is_clear_and_leaves_nothing_behind(run_dir, hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    hub.fail_commit_with = 403
    with pytest.raises(PublishError) as error:
        publish_hub(run_dir, "bnb-nf4", "quantgate-test/{model}-{recipe}", private=True, branch="main",
                    endpoint=hub.endpoint, force=False, dry_run=False)
    assert "refused the upload of quantgate-test/SmolLM2-135M-Instruct-bnb-nf4@main: HTTP 403" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # the staged folder is gone
    assert FAKE_TOKEN not in str(error.value)


def test_dry_run_uploads_nothing(run_dir, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    result = publish_hub(run_dir, "bnb-nf4", "org/{model}-{recipe}", private=True, branch="main",
                         endpoint=hub.endpoint, force=False, dry_run=True)
    assert result["dry_run"] and "model.safetensors" in result["would_upload"] and hub.requests == []


def test_the_token_is_in_nothing_the_run_wrote(tiny_llama, cache_dir, prefect_server, tmp_path, hub, monkeypatch):
    """A whole flow run publishing to the Hub endpoint: the token goes to the endpoint and nowhere else (the tiny
    Llama: the token's path is the flow's, whatever the model)."""
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.quantize_model import quantize_model

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    run_dir = Path(quantize_model(str(PROJECT / "configs" / "default.yaml"), overrides=[
        f"model.source={tiny_llama}", "model.dtype=float32", f"output.runs_dir={tmp_path / 'runs'}",
        f"output.cache_dir={cache_dir}", f"output.history_db={tmp_path / 'runs' / 'history.sqlite'}",
        "recipes=[torchao-int8-weight-only]", *QUICK,
        f"steps.publish={{target: hub, hub_repo: 'quantgate-test/{{model}}-{{recipe}}', hub_endpoint: '{hub.endpoint}'}}"]))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    entry = metrics["recipes"]["torchao-int8-weight-only"]
    assert entry["steps"]["publish"]["status"] == "ok", entry
    assert hub.commits and any(FAKE_TOKEN in r["headers"].get("authorization", "") for r in hub.requests)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path
    assert FAKE_TOKEN not in json.dumps(os.environ.get("PREFECT_HOME", ""))

    async def stored():
        async with get_client() as client:
            artifacts = await client.read_artifacts()
            logs = []
            while batch := await client.read_logs(limit=200, offset=len(logs)):
                logs += batch
            return artifacts, logs

    artifacts, logs = asyncio.run(stored())
    assert artifacts, "no artifacts"
    assert logs, "no logs"
    assert any((a.key or "").endswith("torchao-int8-weight-only-card") for a in artifacts)
    from flows.artifacts import artifact_key
    from quantgate.card import model_name

    key = artifact_key("quantgate", model_name(metrics), "torchao-int8-weight-only", "metrics")  # this run's recipe's
    table = next(a for a in artifacts if a.key == key and metrics["run_id"] in (a.description or ""))
    assert [row["recipe"] for row in json.loads(table.data)] == ["reference", "torchao-int8-weight-only"]
    assert FAKE_TOKEN not in json.dumps([a.model_dump(mode="json") for a in artifacts])
    assert not any(FAKE_TOKEN in log.message for log in logs)


def test_a_hub_upload_waits_for_approval_and_silence_publishes_nothing(
        tiny_llama, cache_dir, prefect_server, tmp_path, hub, monkeypatch):
    """steps.publish.approve: the flow run pauses before each recipe's upload with its verdict and card in the form;
    one approved with `quantgate approve` (it uploads only then; 20 s to answer, room for a loaded CI host), one left
    unanswered: rejected when its time is up (a reviewer's rejection resumes the run the same way), and the run goes
    on to a normal end."""
    import threading

    from prefect.client.orchestration import get_client
    from prefect.input.actions import read_flow_run_input

    from flows import approval
    from flows.quantize_model import quantize_model
    from quantgate import cli

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    recipes = ["torchao-int8-weight-only", "{use: torchao-int8-weight-only, name: int8-unanswered}"]
    overrides = [f"model.source={tiny_llama}", "model.dtype=float32", f"output.runs_dir={tmp_path / 'runs'}",
                 f"output.cache_dir={cache_dir}", f"output.history_db={tmp_path / 'runs' / 'history.sqlite'}",
                 f"recipes=[{', '.join(recipes)}]", *QUICK,
                 f"steps.publish={{target: hub, hub_repo: 'quantgate-test/{{model}}-{{recipe}}', "
                 f"hub_endpoint: '{hub.endpoint}', approve: true, approve_timeout_s: 20}}"]
    finished = {}
    flow = threading.Thread(target=lambda: finished.update(state=quantize_model(
        str(PROJECT / "configs" / "default.yaml"), overrides=overrides, return_state=True)))
    flow.start()

    def paused_for(recipe: str) -> tuple[str, str]:
        deadline = time.time() + 300
        while time.time() < deadline and flow.is_alive():
            runs = list((tmp_path / "runs").glob("2*"))
            if runs and (flow_run := approval.waiting().get(approval.pause_key(runs[0].name, recipe))):
                return runs[0].name, flow_run
            time.sleep(0.5)
        raise AssertionError(f"no pause for {recipe}: {finished}")

    def approve(*argv: str) -> tuple[int, str]:
        """`quantgate approve`, asked again while Prefect refuses it because the form's schema, saved just after the
        pause, is not there yet."""
        for _ in range(20):
            shown = io.StringIO()
            with contextlib.redirect_stdout(shown), contextlib.redirect_stderr(shown):
                code = cli.main(["approve", *argv])
            if code == 0 or "schema" not in shown.getvalue():
                return code, shown.getvalue()
            time.sleep(0.5)
        return code, shown.getvalue()

    run_id, flow_run = paused_for("torchao-int8-weight-only")
    with get_client(sync_client=True):
        form = read_flow_run_input(f"paused-{approval.pause_key(run_id, 'torchao-int8-weight-only')}-description",
                                   flow_run_id=flow_run)
    assert f"Publish torchao-int8-weight-only of run {run_id}" in form and "| reference |" in form and "KL" in form
    assert hub.commits == []  # nothing uploaded while it waits
    code, shown = approve(run_id, "torchao-int8-weight-only", "--reviewer", "alice", "--reason", "numbers as expected")
    assert code == 0 and f"approved: torchao-int8-weight-only of run {run_id}" in shown, shown
    flow.join(600)
    from quantgate.card import model_name

    metrics = json.loads((tmp_path / "runs" / run_id / "metrics.json").read_text())
    recipes = metrics["recipes"]
    approved = recipes["torchao-int8-weight-only"]
    assert approved["steps"]["publish"]["status"] == "ok"
    assert approved["publish"]["approval"] == "approved by alice: numbers as expected"
    assert {c["repo"] for c in hub.commits} == {f"quantgate-test/{model_name(metrics)}-torchao-int8-weight-only"}
    assert recipes["int8-unanswered"]["status"] == "skipped"
    assert recipes["int8-unanswered"]["reason"] == "publish: not approved within 20 s (steps.publish.approve_timeout_s)"
    assert finished["state"].is_completed()
