"""Run history, the regression gate and the dashboard, on the golden run record (a real run's, checked in)."""
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from quantgate import dashboard, gate, history
from quantgate.settings import GateSettings


def rerun(golden_run: Path, root: Path, run_id: str, started_at: str, change=None, env_change=None) -> Path:
    """A copy of a real run as the next night's run, with a planted change to its record."""
    copy = root / run_id
    shutil.copytree(golden_run, copy, ignore=shutil.ignore_patterns("checkpoint", "*.safetensors"))
    metrics = json.loads((copy / "metrics.json").read_text())
    metrics.update(run_id=run_id, started_at=started_at)
    if change:
        change(metrics)
    (copy / "metrics.json").write_text(json.dumps(metrics))
    if env_change:
        env = json.loads((copy / "env.json").read_text())
        env.update(env_change)
        (copy / "env.json").write_text(json.dumps(env))
    return copy


@pytest.fixture
def db(new_history, golden_run):
    """The golden run recorded in a new history, SQLite and PostgreSQL alike."""
    location = new_history()
    history.record_run(location, golden_run)
    return location


def test_every_run_is_recorded_and_listed(golden_run, db):
    metrics = json.loads((golden_run / "metrics.json").read_text())
    cells = history.cells(db)
    assert {c["recipe"] for c in cells} == set(metrics["recipes"])
    nf4 = history.cells(db, recipe="bnb-nf4")[0]
    assert nf4["status"] == "passed" and nf4["kl_mean"] == metrics["recipes"]["bnb-nf4"]["validate"]["kl_mean"]
    assert nf4["decode_ms"] == metrics["recipes"]["bnb-nf4"]["benchmark"]["latency"]["decode_ms_per_token"]
    assert [c["recipe"] for c in history.cells(db, status="error")] == ["bnb-int8"]


def test_first_run_sets_the_baseline_and_an_identical_run_passes(golden_run, db, tmp_path):
    first = json.loads((golden_run / "metrics.json").read_text())["run_id"]
    assert {c["gate"] for c in gate.gate_run(db, first, GateSettings())} <= {"baseline", "skipped"}
    again = rerun(golden_run, tmp_path, "night-2", "2999-01-01T02:00:00+00:00")
    history.record_run(db, again)
    results = {c["recipe"]: c for c in gate.gate_run(db, "night-2", GateSettings())}
    assert results["bnb-nf4"]["gate"] == results["torchao-int8-weight-only"]["gate"] == "pass"
    assert results["bnb-nf4"]["baseline_run"] == first and results["bnb-nf4"]["env_changes"] == []


def test_planted_regressions_are_named_with_the_environment_change(golden_run, db, tmp_path):
    def memory_grows(m):
        m["recipes"]["bnb-nf4"]["quantize"]["real_bytes"] = int(m["recipes"]["bnb-nf4"]["quantize"]["real_bytes"] * 1.3)

    night2 = rerun(golden_run, tmp_path, "night-2", "2999-01-01T02:00:00+00:00", memory_grows,
                   env_change={"transformers": "5.99.0"})
    history.record_run(db, night2)
    nf4 = next(c for c in gate.gate_run(db, "night-2", GateSettings()) if c["recipe"] == "bnb-nf4")
    before = json.loads((golden_run / "metrics.json").read_text())["recipes"]["bnb-nf4"]["quantize"]["real_bytes"]
    assert nf4["gate"] == "regressed"
    assert nf4["regressions"] == [f"weight memory {before / 1e9:.3f} → {int(before * 1.3) / 1e9:.3f} GB (+30.0%, limit +5%)"]
    assert nf4["env_changes"] == ["transformers 5.23.0 → 5.99.0"]

    def turns_nonfinite(m):
        entry = m["recipes"]["torchao-int8-weight-only"]
        entry.update(status="failed", reason="validate: non-finite logits")
        entry["validate"].update(verdict="fail", first_nonfinite_module="model.layers.1.self_attn.q_proj")

    night3 = rerun(golden_run, tmp_path, "night-3", "2999-01-02T02:00:00+00:00", turns_nonfinite)
    history.record_run(db, night3)
    int8 = next(c for c in gate.gate_run(db, "night-3", GateSettings()) if c["recipe"] == "torchao-int8-weight-only")
    assert int8["gate"] == "regressed"
    assert "non-finite output, first at model.layers.1.self_attn.q_proj" in int8["regressions"]
    assert int8["regressions"][0] == "status passed → failed: validate: non-finite logits"
    # The last passing run is the baseline: night 2's int8 (night 2 regressed only nf4's memory).
    assert int8["baseline_run"] == "night-2"

    def writes_worse_code(m):  # a HumanEval result as the evaluate step records one, with a significant drop
        m["recipes"]["bnb-nf4"]["evaluate"]["humaneval"] = {
            "pass_at_1": 0.35, "n": 20, "delta_acc": -0.3, "delta_ci95": [-0.5, -0.1], "significant": True,
            "flips": {"right_to_wrong": 6, "wrong_to_right": 0, "agreement": 0.7, "mcnemar_p": 0.03125}}

    history.record_run(db, rerun(golden_run, tmp_path, "night-4", "2999-01-03T02:00:00+00:00", writes_worse_code))
    nf4 = next(c for c in gate.gate_run(db, "night-4", GateSettings()) if c["recipe"] == "bnb-nf4")
    assert nf4["regressions"] == ["significant HumanEval pass@1 drop: -0.3000 [-0.5000, -0.1000] (baseline not measured, "
                                  "not significant)"]


def test_a_no_drop_too_weak_to_mean_no_drop_is_noted(golden_run, db, tmp_path):
    def quiet_on_few_questions(m):  # 57 questions, 4 flipped: a drop under 9.4 points could go unseen
        m["recipes"]["torchao-int8-weight-only"]["evaluate"]["mmlu"].update(mde=0.0941, mde_power=0.8, significant=False)

    history.record_run(db, rerun(golden_run, tmp_path, "night-2", "2999-01-01T02:00:00+00:00", quiet_on_few_questions))
    int8 = next(c for c in gate.gate_run(db, "night-2", GateSettings()) if c["recipe"] == "torchao-int8-weight-only")
    assert int8["gate"] == "pass" and int8["mmlu_mde"] == 0.0941
    assert int8["notes"][-1] == ("MMLU: no significant drop, but a drop under 9.4 points could go unseen (80% power): "
                                 "too weak to mean no drop of 5")
    lenient = GateSettings(weak_power=0.1)  # a team that accepts not seeing a 10-point drop
    noted = next(c for c in gate.gate_run(db, "night-2", lenient) if c["recipe"] == "torchao-int8-weight-only")["notes"]
    assert not any(n.startswith("MMLU") for n in noted)


FIRST_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, started_at TEXT, finished_at TEXT, model TEXT, status TEXT, run_dir TEXT,
    env TEXT, metrics TEXT, nightly_id TEXT);
CREATE TABLE cells (run_id TEXT, model TEXT, recipe TEXT, started_at TEXT, status TEXT, reason TEXT, verdict TEXT,
    nonfinite_module TEXT, kl_mean REAL, top1 REAL, real_bytes INTEGER, peak_memory INTEGER,
    decode_ms REAL, speedup REAL, card TEXT, PRIMARY KEY (run_id, recipe));
"""  # the tables as they were first made: before the scores table and the columns since (`tower`, `gate`, ...)


def test_a_database_from_before_the_added_columns_gains_them(golden_run, tmp_path):
    import sqlite3

    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as conn:
        conn.executescript(FIRST_SCHEMA)
    history.record_run(old, golden_run)
    assert {c["tower"] for c in history.cells(old)} == {None} and len(history.cells(old)) >= 5
    assert history.cells(old, recipe="bnb-nf4")[0]["mmlu_value"] is not None  # scores, a table of its own now


def _record_many(db: str, run_dirs: list[str]) -> None:
    for run_dir in run_dirs:
        history.record_run(db, run_dir)


def test_four_processes_recording_at_once_lose_nothing_and_the_gate_reads_them(golden_run, new_history, tmp_path):
    """16 nights from 4 processes at once into a new history (each process creates the tables if it comes first):
    every row there, and the gate and the dashboard read them."""
    import multiprocessing

    copies = [str(rerun(golden_run, tmp_path, f"night-{i:02d}", f"2999-01-{i + 1:02d}T02:00:00+00:00"))
              for i in range(16)]
    db = new_history()
    workers = [multiprocessing.get_context("spawn").Process(target=_record_many, args=(str(db), copies[i::4]))
               for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0
    recipes = json.loads((golden_run / "metrics.json").read_text())["recipes"]
    cells = history.cells(db)
    assert len({c["run_id"] for c in cells}) == 16 and len(cells) == 16 * len(recipes)
    results = {c["recipe"]: c for c in gate.gate_run(db, "night-15", GateSettings())}
    assert results["bnb-nf4"]["gate"] == "pass" and results["bnb-nf4"]["baseline_run"] == "night-14"
    history.set_gate(db, list(results.values()))
    page = dashboard.render(db)
    assert page.count("<table class='matrix'>") == 1 and "night-15" in page


def test_dashboard_renders_the_matrix_and_trends(golden_run, db, tmp_path):
    history.record_run(db, rerun(golden_run, tmp_path, "night-2", "2999-01-01T02:00:00+00:00"))
    page = dashboard.write(db, tmp_path / "dashboard.html").read_text()
    assert page.count("<table class='matrix'>") == 1 and "http" not in page.replace("charset", "")
    assert "style='background:#2e9d4f'" in page and "style='background:#d2362f'" in page  # pass and the error
    assert page.count("<polyline") >= 8 and "report.md" in page and "card.md" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt install chromium)")
def test_dashboard_in_headless_chromium(golden_run, db, tmp_path, request):
    history.record_run(db, rerun(golden_run, tmp_path, "night-2", "2999-01-01T02:00:00+00:00"))
    page = dashboard.write(db, tmp_path / "dashboard.html")
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert "class=\"matrix\"" in dom.stdout and "<polyline" in dom.stdout
    shot = Path(request.config.rootpath) / "tests" / "output" / "dashboard.png"
    shot.parent.mkdir(exist_ok=True)
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,900", page.as_uri()], capture_output=True, timeout=120, check=True)
    # Rendered, not only parsed: the matrix's pass and fail colours and the trend line's blue are on screen.
    pixels = set(Image.open(shot).convert("RGB").getdata())
    for colour in (dashboard.COLOURS["pass"], dashboard.COLOURS["fail"], "#3b6fb6"):
        assert tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5)) in pixels, colour


def test_latency_is_gated_against_the_spread_measured_over_processes(golden_run, new_history, tmp_path):
    """A synthetic history: a baseline whose fresh processes spread by 8%; tonight's decode 12% slower is inside
    twice that spread (noise), 25% slower is outside it (a regression), whatever the gate's flat 10%. A spread of
    one process's repeats, or a run that shared its machine, gets no latency verdict, and the gate says so."""
    def latency(factor, spread, over="processes", comparable=True):
        def change(m):
            bench = m["recipes"]["bnb-nf4"]["benchmark"]["latency"]
            bench.update(decode_ms_per_token=10.0 * factor, decode_spread=spread, decode_spread_over=over)
            if not comparable:
                bench["comparable"] = False
        return change

    settings = GateSettings(latency_increase=0.10, latency_spread_multiple=2.0)
    base = rerun(golden_run, tmp_path, "base", "2999-01-01T02:00:00+00:00", latency(1.0, 0.08))
    night = {}
    for run_id, change in (("inside", latency(1.12, 0.01)), ("outside", latency(1.25, 0.01)),
                           ("one-process", latency(1.5, 0.01, over="repeats")),
                           ("shared", latency(1.5, 0.01, comparable=False))):
        db = new_history(run_id)  # each night against the same baseline
        history.record_run(db, base)
        history.record_run(db, rerun(golden_run, tmp_path, run_id, "2999-01-02T02:00:00+00:00", change))
        night[run_id] = {c["recipe"]: c for c in gate.gate_run(db, run_id, settings)}["bnb-nf4"]
    assert night["inside"]["baseline_run"] == "base"
    assert not any("decode latency" in r for r in night["inside"]["regressions"])
    assert "decode latency 10.00 → 12.50 ms/token (+25.0%, limit +16.0%)" in night["outside"]["regressions"]
    assert night["one-process"]["gate"] == "pass" and "not measured over fresh processes" in night["one-process"]["notes"][0]
    assert night["shared"]["gate"] == "pass" and "shared the machine" in night["shared"]["notes"][0]


def test_a_baseline_with_other_settings_is_not_compared(golden_run, db, new_history, tmp_path):
    """The quick nightly that cried wolf: its baseline had other benchmark settings, its peak memory 20% lower."""
    import yaml

    def less_memory(m):
        m["recipes"]["bnb-nf4"]["benchmark"]["memory"]["host_private_peak"] //= 2
    other = rerun(golden_run, tmp_path, "other-settings", "2998-12-31T02:00:00+00:00", less_memory)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["steps"]["benchmark"]["prompt_tokens"] = 4096
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    history.record_run(db, other)
    history.record_run(db, rerun(golden_run, tmp_path, "tonight", "2999-01-01T02:00:00+00:00"))
    nf4 = {c["recipe"]: c for c in gate.gate_run(db, "tonight", GateSettings())}["bnb-nf4"]
    original = json.loads((golden_run / "metrics.json").read_text())["run_id"]
    assert nf4["gate"] == "pass" and nf4["baseline_run"] == original  # the same settings' run, not the newer one
    alone_db = new_history("alone")
    history.record_run(alone_db, tmp_path / "other-settings")
    history.record_run(alone_db, tmp_path / "tonight")
    alone = {c["recipe"]: c for c in gate.gate_run(alone_db, "tonight", GateSettings())}["bnb-nf4"]
    assert alone["gate"] == "baseline" and alone["notes"] == ["1 earlier passing runs had other settings: not compared"]


def test_a_setting_added_since_at_its_old_meaning_keeps_the_baseline(golden_run):
    """The golden run was recorded before steps.evaluate.mmlu_subjects: null there (every subject) is the same
    fingerprint, so the next night still has its baseline; subjects asked are other settings."""
    import yaml

    config = yaml.safe_load((golden_run / "config.yaml").read_text())
    assert "mmlu_subjects" not in config["steps"]["evaluate"]
    before = history.fingerprint(config, "bnb-nf4")
    config["steps"]["evaluate"]["mmlu_subjects"] = None
    assert history.fingerprint(config, "bnb-nf4") == before
    config["steps"]["evaluate"]["mmlu_subjects"] = ["virology"]
    assert history.fingerprint(config, "bnb-nf4") != before


def test_the_dashboard_shows_what_the_gate_decided(golden_run, db, tmp_path):
    def memory_grows(m):
        m["recipes"]["bnb-nf4"]["quantize"]["real_bytes"] = int(m["recipes"]["bnb-nf4"]["quantize"]["real_bytes"] * 1.3)

    history.record_run(db, rerun(golden_run, tmp_path, "night-2", "2999-01-01T02:00:00+00:00", memory_grows))
    results = gate.gate_run(db, "night-2", GateSettings())
    history.set_gate(db, results)
    nf4 = history.cells(db, recipe="bnb-nf4")[0]
    assert nf4["status"] == "passed" and nf4["gate"] == "regressed" and dashboard.light(nf4) == "fail"
    page = dashboard.render(db)
    assert "title='regressed: weight memory" in page


def test_kl_from_another_compute_dtype_is_not_judged(golden_run, db, tmp_path):
    """`compute_dtype: auto` computes in bf16 on a host with native bf16 and in float32 on one without: int8's KL on
    SmolLM2 reads about 0.006 and 0.002, and computing in bf16 alone moves it 0.0009 (docs/validation.md). Across
    dtypes the gate says it did not judge KL; a baseline of the same dtype is taken where there is one."""
    int8 = "torchao-int8-weight-only"
    before = json.loads((golden_run / "metrics.json").read_text())["recipes"][int8]["validate"]

    def on_another_host(m):
        other = "bfloat16" if before["compute_dtype"] == "float32" else "float32"
        m["recipes"][int8]["validate"].update(compute_dtype=other, kl_mean=before["kl_mean"] * 3)

    history.record_run(db, rerun(golden_run, tmp_path, "night-2", "2999-01-01T02:00:00+00:00", on_another_host))
    cell = next(c for c in gate.gate_run(db, "night-2", GateSettings()) if c["recipe"] == int8)
    assert cell["gate"] == "pass" and cell["regressions"] == []
    assert cell["notes"][0] == (f"KL not judged: computed in {cell['compute_dtype']} in this run and in "
                                f"{before['compute_dtype']} in the baseline's")

    def kl_triples(m):
        m["recipes"][int8]["validate"]["kl_mean"] = before["kl_mean"] * 3

    history.record_run(db, rerun(golden_run, tmp_path, "night-3", "2999-01-02T02:00:00+00:00", kl_triples))
    cell = next(c for c in gate.gate_run(db, "night-3", GateSettings()) if c["recipe"] == int8)
    assert cell["baseline_run"] == json.loads((golden_run / "metrics.json").read_text())["run_id"]  # not night 2's
    assert cell["gate"] == "regressed" and cell["regressions"][0].startswith("KL mean ")
