"""Run history in an embedded SQLite database, and the regression gate that reads it.

Every run's record goes in (`record_run`): one row per run with its environment, one row per recipe ("cell")
with the figures the gate and the dashboard use, and one row per cell and evaluation ("scores"), whatever
evaluations are registered. `regressions` compares a cell with the last passing run of the same model and recipe."""
from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import yaml

from quantgate import evaluations
from quantgate.formats import peak_memory

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, started_at TEXT, finished_at TEXT, model TEXT, status TEXT, run_dir TEXT,
    env TEXT, metrics TEXT, nightly_id TEXT);
CREATE TABLE IF NOT EXISTS cells (
    run_id TEXT, model TEXT, recipe TEXT, started_at TEXT, status TEXT, reason TEXT, verdict TEXT,
    nonfinite_module TEXT, kl_mean REAL, top1 REAL, real_bytes INTEGER, peak_memory INTEGER,
    decode_ms REAL, speedup REAL, card TEXT, PRIMARY KEY (run_id, recipe));
CREATE TABLE IF NOT EXISTS scores (
    run_id TEXT, recipe TEXT, evaluation TEXT, value REAL, delta REAL, low REAL, high REAL, significant INTEGER,
    PRIMARY KEY (run_id, recipe, evaluation));
"""
# Columns added since SCHEMA was first made: every database gains them on connecting.
ADDED = {"tower": "TEXT", "tower_cosine": "REAL", "decode_spread": "REAL", "decode_spread_over": "TEXT",
         "latency_comparable": "INTEGER", "fingerprint": "TEXT", "gate": "TEXT", "regressions": "TEXT",
         "compute_dtype": "TEXT"}
ADDED_SCORES = {"mde": "REAL"}  # the same for the scores table
RECORDED = ("tower", "tower_cosine", "decode_spread", "decode_spread_over", "latency_comparable", "fingerprint",
            "compute_dtype")
CELL_FIELDS = ("run_id", "model", "recipe", "started_at", "status", "reason", "verdict", "nonfinite_module",
               "kl_mean", "top1", "real_bytes", "peak_memory", "decode_ms", "speedup", "card", *RECORDED)
SCORE_FIELDS = ("value", "delta", "low", "high", "significant", "mde")  # a cell's `{evaluation}_{field}` keys


class HistoryError(RuntimeError):
    """A history database that is missing or is not one: a one-line message naming the file."""


def connect(db: str | Path, create: bool = False) -> sqlite3.Connection:
    """The history at `db`; only a writer (create=True) makes it where there is none."""
    db = Path(db)
    if not create and not db.is_file():
        raise HistoryError(f"{db}: no history database there (a run creates it at its output.history_db)")
    if create:
        db.parent.mkdir(parents=True, exist_ok=True)
    # Several runs finishing together wait for each other's write lock (up to 60 s) rather than fail.
    conn = sqlite3.connect(db, timeout=60)
    conn.row_factory = sqlite3.Row
    try:
        tables = {row["name"] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        conn.executescript(SCHEMA)
        for table, added in (("cells", ADDED), ("scores", ADDED_SCORES)):
            have = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
            for column, kind in added.items():
                if column not in have:
                    _add_column(conn, table, column, kind)
        if "runs" in tables and "scores" not in tables:  # a history from before the scores table: once
            _backfill_scores(conn)
    except sqlite3.DatabaseError as e:
        conn.close()
        raise HistoryError(f"{db}: not a quantgate history database (sqlite: {e})") from None
    return conn


def _add_column(conn: sqlite3.Connection, table: str, column: str, kind: str) -> None:
    try:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    except sqlite3.OperationalError as e:  # another process added it between our look and this
        if "duplicate column" not in str(e):
            raise


def _backfill_scores(conn: sqlite3.Connection) -> None:
    """Scores for runs recorded before the scores table (their full record is in runs.metrics)."""
    missing = conn.execute("SELECT run_id, metrics FROM runs").fetchall()
    with conn:
        for row in missing:
            metrics = json.loads(row["metrics"])
            for recipe in metrics["recipes"]:
                _insert_scores(conn, metrics, recipe)


def scores_of(entry: dict) -> dict[str, dict]:
    """A recipe's evaluations as the history keeps them: value, delta against the reference and its interval."""
    out = {}
    for e in evaluations.registered():
        m = entry.get("evaluate", {}).get(e.name, {})
        if e.metric not in m:
            continue
        low, high = m.get("delta_ci95") or (None, None)
        out[e.name] = {"value": m[e.metric], "delta": m.get("delta_acc", m.get(f"delta_{e.metric}")), "low": low,
                       "high": high, "significant": m.get("significant"), "mde": m.get("mde")}
    return out


def _insert_scores(conn: sqlite3.Connection, metrics: dict, recipe: str) -> None:
    for name, s in scores_of(metrics["recipes"][recipe]).items():
        conn.execute(f"INSERT OR REPLACE INTO scores (run_id, recipe, evaluation, {', '.join(SCORE_FIELDS)}) "
                     f"VALUES (?, ?, ?, {', '.join('?' * len(SCORE_FIELDS))})",
                     (metrics["run_id"], recipe, name, *[s[k] for k in SCORE_FIELDS]))


def worst_tower(validate: dict) -> tuple[str | None, float | None]:
    """A multimodal recipe's tower with the lowest embedding cosine to the reference's, and that cosine."""
    measured = [(t["embedding_cosine_min"], name) for name, t in validate.get("towers", {}).items()]
    if not measured:
        return None, None
    cosine, name = min(measured, key=lambda m: -2 if m[0] is None else m[0])
    return name, cosine


def fingerprint(config: dict, recipe: str) -> str | None:
    """What shapes a cell's figures besides the code: the model as loaded, the recipe and the measuring steps'
    settings (timeouts and retries left out). The gate compares a cell only with a baseline of the same."""
    spec = next((r for r in config.get("recipes", []) if r.get("name") == recipe), None)
    if spec is None:
        return None
    model = {k: config["model"].get(k) for k in ("source", "revision", "dtype", "compute_dtype", "device", "max_memory")}
    steps = {step: {k: v for k, v in config.get("steps", {}).get(step, {}).items() if k not in ("timeout_s", "retries")}
             for step in ("validate", "evaluate", "benchmark")}
    return hashlib.sha256(json.dumps([model, spec, steps], sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_of(metrics: dict, recipe: str, run_dir: Path) -> dict:
    entry = metrics["recipes"][recipe]
    v, b, q = (entry.get(k, {}) for k in ("validate", "benchmark", "quantize"))
    latency = b.get("latency", {})
    card = run_dir / recipe / "card.md"
    tower, tower_cosine = worst_tower(v)
    return {"run_id": metrics["run_id"], "model": metrics["model"]["source"], "recipe": recipe,
            "started_at": metrics["started_at"], "status": entry["status"], "reason": entry.get("reason"),
            "verdict": v.get("verdict"), "nonfinite_module": v.get("first_nonfinite_module"),
            "kl_mean": v.get("kl_mean"), "top1": v.get("top1_agreement"), "real_bytes": q.get("real_bytes"),
            "peak_memory": peak_memory(b), "decode_ms": latency.get("decode_ms_per_token"),
            "speedup": latency.get("speedup_vs_reference"), "card": str(card) if card.is_file() else None,
            "tower": tower, "tower_cosine": tower_cosine, "decode_spread": latency.get("decode_spread"),
            "decode_spread_over": latency.get("decode_spread_over"),
            "latency_comparable": latency.get("comparable", True) if latency else None,
            "fingerprint": fingerprint(_config(run_dir), recipe), "compute_dtype": v.get("compute_dtype")}


def _config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def record_run(db: str | Path, run_dir: str | Path) -> str:
    """Insert (or replace) one run and its cells; returns the run id."""
    run_dir = Path(run_dir).resolve()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    with closing(connect(db, create=True)) as conn, conn:
        conn.execute("INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (metrics["run_id"], metrics["started_at"], metrics["finished_at"], metrics["model"]["source"],
                      metrics["status"], str(run_dir), json.dumps(env), json.dumps(metrics), metrics.get("nightly_id")))
        for recipe in metrics["recipes"]:
            cell = cell_of(metrics, recipe, run_dir)
            conn.execute(f"INSERT OR REPLACE INTO cells ({', '.join(CELL_FIELDS)}) "
                         f"VALUES ({', '.join('?' * len(CELL_FIELDS))})",
                         [cell[k] for k in CELL_FIELDS])
            _insert_scores(conn, metrics, recipe)
    return metrics["run_id"]


def cells(db: str | Path, model: str | None = None, recipe: str | None = None, status: str | None = None,
          limit: int | None = None) -> list[dict]:
    """Cells, newest first, with each run's directory."""
    where, args = [], []
    for column, value in (("c.model", model), ("c.recipe", recipe), ("c.status", status)):
        if value:
            where.append(f"{column} = ?")
            args.append(value)
    sql = ("SELECT c.*, r.run_dir FROM cells c JOIN runs r USING (run_id)"
           + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY c.started_at DESC, c.run_id DESC"
           + (f" LIMIT {int(limit)}" if limit else ""))
    with closing(connect(db)) as conn:
        return [with_scores(conn, dict(row)) for row in conn.execute(sql, args)]


def with_scores(conn: sqlite3.Connection, cell: dict) -> dict:
    """The cell with `{evaluation}_{value,delta,low,high,significant}` for every registered evaluation (None
    where it was not measured)."""
    found = {r["evaluation"]: dict(r) for r in conn.execute(
        "SELECT * FROM scores WHERE run_id = ? AND recipe = ?", (cell["run_id"], cell["recipe"]))}
    for e in evaluations.registered():
        cell.update({f"{e.name}_{k}": found.get(e.name, {}).get(k) for k in SCORE_FIELDS})
    return cell


def run_ids(db: str | Path) -> set[str]:
    with closing(connect(db)) as conn:
        return {row["run_id"] for row in conn.execute("SELECT run_id FROM runs")}


def nightly_runs(db: str | Path, nightly_id: str) -> list[str]:
    with closing(connect(db)) as conn:
        return [r["run_id"] for r in conn.execute("SELECT run_id FROM runs WHERE nightly_id = ? ORDER BY started_at",
                                                   (nightly_id,))]


def run_env(db: str | Path, run_id: str) -> dict:
    with closing(connect(db)) as conn:
        row = conn.execute("SELECT env FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return json.loads(row["env"]) if row else {}


def last_passing(db: str | Path, cell: dict) -> dict | None:
    """The newest passing cell of the same model, recipe and settings (fingerprint) that started before it, computed
    in the same dtype where one was (`compute_dtype: auto` resolves per host)."""
    with closing(connect(db)) as conn:
        row = conn.execute("SELECT c.*, r.run_dir FROM cells c JOIN runs r USING (run_id) WHERE c.model = ? AND "
                           "c.recipe = ? AND c.fingerprint = ? AND c.status = 'passed' AND c.started_at < ? "
                           "ORDER BY (c.compute_dtype IS ?) DESC, c.started_at DESC LIMIT 1",
                           (cell["model"], cell["recipe"], cell["fingerprint"], cell["started_at"],
                            cell.get("compute_dtype"))).fetchone()
        return with_scores(conn, dict(row)) if row else None


def passing_elsewhere(db: str | Path, cell: dict) -> int:
    """How many earlier passing cells of this model and recipe ran with other settings (not compared)."""
    with closing(connect(db)) as conn:
        return conn.execute("SELECT COUNT(*) FROM cells WHERE model = ? AND recipe = ? AND status = 'passed' AND "
                            "started_at < ? AND fingerprint IS NOT ?", (cell["model"], cell["recipe"],
                                                                          cell["started_at"], cell["fingerprint"])
                            ).fetchone()[0]


def run_cells(db: str | Path, run_id: str) -> list[dict]:
    with closing(connect(db)) as conn:
        return [with_scores(conn, dict(r)) for r in conn.execute("SELECT * FROM cells WHERE run_id = ?", (run_id,))]


def set_gate(db: str | Path, results: list[dict]) -> None:
    """What the nightly gate decided of each cell, kept beside it (the dashboard shows it)."""
    with closing(connect(db, create=True)) as conn, conn:
        for r in results:
            conn.execute("UPDATE cells SET gate = ?, regressions = ? WHERE run_id = ? AND recipe = ?",
                         (r["gate"], json.dumps(r["regressions"]), r["run_id"], r["recipe"]))
