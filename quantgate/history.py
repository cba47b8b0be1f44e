"""Run history in a database, and the regression gate that reads it: an embedded SQLite file (the default) or a
PostgreSQL server for several hosts (`postgresql://USER@HOST/DB`), through SQLAlchemy, one schema for both.

Every run's record goes in (`record_run`): one row per run with its environment, one row per recipe ("cell")
with the figures the gate and the dashboard use, and one row per cell and evaluation ("scores"), whatever
evaluations are registered. `regressions` compares a cell with the last passing run of the same model and recipe."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
from pathlib import Path

import sqlalchemy as sa
import yaml
from sqlalchemy.dialects import postgresql, sqlite

from quantgate import evaluations
from quantgate.formats import peak_memory
from quantgate.paths import is_database_url


class Flag(sa.types.TypeDecorator):
    """A yes/no kept as 0/1 in both databases (PostgreSQL will not take a Python bool for an integer)."""
    impl, cache_ok = sa.Integer, True

    def process_bind_param(self, value, dialect):
        return None if value is None else int(value)


METADATA = sa.MetaData()
RUNS = sa.Table("runs", METADATA, sa.Column("run_id", sa.Text, primary_key=True),
                *(sa.Column(c, sa.Text) for c in ("started_at", "finished_at", "model", "status", "run_dir", "env",
                                                 "metrics", "nightly_id")))
CELLS = sa.Table(
    "cells", METADATA, sa.Column("run_id", sa.Text, primary_key=True), sa.Column("model", sa.Text),
    sa.Column("recipe", sa.Text, primary_key=True),
    *(sa.Column(c, sa.Text) for c in ("started_at", "status", "reason", "verdict", "nonfinite_module")),
    sa.Column("kl_mean", sa.Float), sa.Column("top1", sa.Float), sa.Column("real_bytes", sa.BigInteger),
    sa.Column("peak_memory", sa.BigInteger), sa.Column("decode_ms", sa.Float), sa.Column("speedup", sa.Float),
    sa.Column("card", sa.Text),
    # added since the table was first made: an older database gains them when it is opened (`_migrate`)
    sa.Column("tower", sa.Text), sa.Column("tower_cosine", sa.Float), sa.Column("decode_spread", sa.Float),
    sa.Column("decode_spread_over", sa.Text), sa.Column("latency_comparable", Flag), sa.Column("fingerprint", sa.Text),
    sa.Column("gate", sa.Text), sa.Column("regressions", sa.Text), sa.Column("compute_dtype", sa.Text))
SCORES = sa.Table(
    "scores", METADATA, *(sa.Column(c, sa.Text, primary_key=True) for c in ("run_id", "recipe", "evaluation")),
    *(sa.Column(c, sa.Float) for c in ("value", "delta", "low", "high")), sa.Column("significant", Flag),
    sa.Column("mde", sa.Float))
RECORDED = ("tower", "tower_cosine", "decode_spread", "decode_spread_over", "latency_comparable", "fingerprint",
            "compute_dtype")
CELL_FIELDS = ("run_id", "model", "recipe", "started_at", "status", "reason", "verdict", "nonfinite_module",
               "kl_mean", "top1", "real_bytes", "peak_memory", "decode_ms", "speedup", "card", *RECORDED)
SCORE_FIELDS = ("value", "delta", "low", "high", "significant", "mde")  # a cell's `{evaluation}_{field}` keys
MIGRATION_LOCK = 0x71677473  # PostgreSQL advisory lock: one process at a time creates or alters the tables


class HistoryError(RuntimeError):
    """A history database that is missing, unreachable or is not one: a one-line message naming it."""


def shown(db: str | Path) -> str:
    """The history's location as a message may name it: a URL without its password."""
    return sa.engine.make_url(db).render_as_string(hide_password=True) if is_database_url(db) else str(db)


def exists(db: str | Path) -> bool:
    """Whether there is a history to read: a database server always answers for itself."""
    return is_database_url(db) or Path(db).is_file()


@functools.cache
def _engine(db: str) -> sa.Engine:
    url = sa.engine.make_url(db if is_database_url(db) else f"sqlite:///{db}")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    # No pool: a connection a forked worker inherited would be shared with its parent.
    if url.get_backend_name() == "postgresql":
        return sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": 10})
    # A writer's transaction takes SQLite's write lock as it begins (the driver's own BEGIN off), so two processes
    # never both find a table missing and both make it; one waits for the other up to 60 s. Readers take none: a
    # history on a read-only mount still reads.
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool, connect_args={"timeout": 60, "isolation_level": None})
    sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(
        "BEGIN IMMEDIATE" if conn.info.get("writer") else "BEGIN"))
    return engine


@contextlib.contextmanager
def writing(engine: sa.Engine):
    """A transaction that writes: on SQLite it holds the write lock from its first statement."""
    with engine.connect() as conn:
        conn.info["writer"] = True
        with conn.begin():
            yield conn


def connect(db: str | Path, create: bool = False) -> sa.Engine:
    """The history at `db`, its tables made or brought up to date; only a writer (create=True) makes a SQLite file
    where there is none."""
    if not is_database_url(db):
        db = Path(db)
        if not create and not db.is_file():
            raise HistoryError(f"{db}: no history database there (a run creates it at its output.history_db)")
        if create:
            db.parent.mkdir(parents=True, exist_ok=True)
    engine = _engine(str(db) if is_database_url(db) else str(Path(db).resolve()))
    try:
        _migrate(engine)
    except sa.exc.SQLAlchemyError as e:
        cause = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        unreachable = isinstance(e, sa.exc.OperationalError) and is_database_url(db)
        what = "unreachable" if unreachable else "not a quantgate history database"
        raise HistoryError(f"{shown(db)}: {what} ({engine.dialect.name}: {cause})") from None
    return engine


_migrated: set[str] = set()


def _migrate(engine: sa.Engine) -> None:
    """The tables made where missing, and columns added since they were first made, once a process."""
    key = engine.url.render_as_string(hide_password=False)
    if key in _migrated:  # a server's tables once a process; a SQLite file's each time (it may be a new file)
        return
    with engine.connect() as conn:
        if _up_to_date(conn):
            if engine.dialect.name == "postgresql":
                _migrated.add(key)
            return
    with writing(engine) as conn:
        # One process at a time makes or alters the tables: PostgreSQL's advisory lock, SQLite's write lock (_engine).
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        had = set(sa.inspect(conn).get_table_names())
        for table in METADATA.sorted_tables:
            conn.execute(sa.schema.CreateTable(table, if_not_exists=True))
        inspector = sa.inspect(conn)
        for table in METADATA.sorted_tables:
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name not in have:
                    kind = column.type.compile(dialect=conn.dialect)
                    conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
        if "runs" in had and "scores" not in had:  # a history from before the scores table: once
            for row in conn.execute(sa.select(RUNS.c.metrics)):
                metrics = json.loads(row.metrics)
                for recipe in metrics["recipes"]:
                    _insert_scores(conn, metrics, recipe)
    if engine.dialect.name == "postgresql":
        _migrated.add(key)


def _up_to_date(conn: sa.Connection) -> bool:
    """Every table there with every column: nothing to make or add (read without a lock)."""
    inspector = sa.inspect(conn)
    tables = set(inspector.get_table_names())
    return all(t.name in tables and {c.name for c in t.columns} <= {c["name"] for c in inspector.get_columns(t.name)}
               for t in METADATA.sorted_tables)


def _upsert(conn: sa.Connection, table: sa.Table, row: dict) -> None:
    """Insert the row, or replace the one with its key (a run recorded again: settled, then finished). Both databases
    keep the same values: NaN as NULL (as SQLite does), no NUL character (which PostgreSQL refuses)."""
    row = {k: None if isinstance(v, float) and math.isnan(v) else v.replace("\0", "") if isinstance(v, str) else v
           for k, v in row.items()}
    insert = (postgresql if conn.dialect.name == "postgresql" else sqlite).insert(table).values(row)
    keys = [c.name for c in table.primary_key]
    conn.execute(insert.on_conflict_do_update(index_elements=keys,
                                              set_={k: insert.excluded[k] for k in row if k not in keys}))


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


def _insert_scores(conn: sa.Connection, metrics: dict, recipe: str) -> None:
    for name, score in scores_of(metrics["recipes"][recipe]).items():
        _upsert(conn, SCORES, {"run_id": metrics["run_id"], "recipe": recipe, "evaluation": name, **score})


def worst_tower(validate: dict) -> tuple[str | None, float | None]:
    """A multimodal recipe's tower with the lowest embedding cosine to the reference's, and that cosine."""
    measured = [(t["embedding_cosine_min"], name) for name, t in validate.get("towers", {}).items()]
    if not measured:
        return None, None
    cosine, name = min(measured, key=lambda m: -2 if m[0] is None else m[0])
    return name, cosine


# Settings added after cells were recorded, at the value that asks what those cells measured: left out, so that those
# cells stay the baseline of the same settings.
ADDED_SETTINGS = {("evaluate", "mmlu_subjects"): None}
_ABSENT = object()


def fingerprint(config: dict, recipe: str) -> str | None:
    """What shapes a cell's figures besides the code: the model as loaded, the recipe and the measuring steps'
    settings (timeouts and retries left out). The gate compares a cell only with a baseline of the same."""
    spec = next((r for r in config.get("recipes", []) if r.get("name") == recipe), None)
    if spec is None:
        return None
    model = {k: config["model"].get(k) for k in ("source", "revision", "dtype", "compute_dtype", "device", "max_memory")}
    steps = {step: {k: v for k, v in config.get("steps", {}).get(step, {}).items()
                    if k not in ("timeout_s", "retries") and ADDED_SETTINGS.get((step, k), _ABSENT) != v}
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
    with writing(connect(db, create=True)) as conn:
        _upsert(conn, RUNS, {"run_id": metrics["run_id"], "started_at": metrics["started_at"],
                             "finished_at": metrics["finished_at"], "model": metrics["model"]["source"],
                             "status": metrics["status"], "run_dir": str(run_dir), "env": json.dumps(env),
                             "metrics": json.dumps(metrics), "nightly_id": metrics.get("nightly_id")})
        for recipe in metrics["recipes"]:
            cell = cell_of(metrics, recipe, run_dir)
            _upsert(conn, CELLS, {**{k: cell[k] for k in CELL_FIELDS}, "gate": None, "regressions": None})  # gated anew
            _insert_scores(conn, metrics, recipe)
    return metrics["run_id"]


def _cells_with_dirs():
    return sa.select(CELLS, RUNS.c.run_dir).select_from(CELLS.join(RUNS, CELLS.c.run_id == RUNS.c.run_id))


def cells(db: str | Path, model: str | None = None, recipe: str | None = None, status: str | None = None,
          limit: int | None = None) -> list[dict]:
    """Cells, newest first, with each run's directory."""
    query = _cells_with_dirs().order_by(CELLS.c.started_at.desc(), CELLS.c.run_id.desc()).limit(limit or None)
    for column, value in ((CELLS.c.model, model), (CELLS.c.recipe, recipe), (CELLS.c.status, status)):
        if value:
            query = query.where(column == value)
    with connect(db).connect() as conn:
        return [with_scores(conn, dict(row._mapping)) for row in conn.execute(query)]


def with_scores(conn: sa.Connection, cell: dict) -> dict:
    """The cell with `{evaluation}_{value,delta,low,high,significant}` for every registered evaluation (None
    where it was not measured)."""
    found = {r.evaluation: dict(r._mapping) for r in conn.execute(
        sa.select(SCORES).where(SCORES.c.run_id == cell["run_id"], SCORES.c.recipe == cell["recipe"]))}
    for e in evaluations.registered():
        cell.update({f"{e.name}_{k}": found.get(e.name, {}).get(k) for k in SCORE_FIELDS})
    return cell


def run_ids(db: str | Path) -> set[str]:
    with connect(db).connect() as conn:
        return set(conn.execute(sa.select(RUNS.c.run_id)).scalars())


def nightly_runs(db: str | Path, nightly_id: str) -> list[str]:
    with connect(db).connect() as conn:
        return list(conn.execute(sa.select(RUNS.c.run_id).where(RUNS.c.nightly_id == nightly_id)
                                 .order_by(RUNS.c.started_at)).scalars())


def run_env(db: str | Path, run_id: str) -> dict:
    with connect(db).connect() as conn:
        env = conn.execute(sa.select(RUNS.c.env).where(RUNS.c.run_id == run_id)).scalar()
    return json.loads(env) if env else {}


def last_passing(db: str | Path, cell: dict) -> dict | None:
    """The newest passing cell of the same model, recipe and settings (fingerprint) that started before it, computed
    in the same dtype where one was (`compute_dtype: auto` resolves per host)."""
    if cell["fingerprint"] is None:  # settings unknown: nothing to compare with
        return None
    query = (_cells_with_dirs()
             .where(CELLS.c.model == cell["model"], CELLS.c.recipe == cell["recipe"], CELLS.c.status == "passed",
                    CELLS.c.fingerprint == cell["fingerprint"], CELLS.c.started_at < cell["started_at"])
             .order_by(CELLS.c.compute_dtype.is_not_distinct_from(cell.get("compute_dtype")).desc(),
                       CELLS.c.started_at.desc()).limit(1))
    with connect(db).connect() as conn:
        row = conn.execute(query).first()
        return with_scores(conn, dict(row._mapping)) if row else None


def passing_elsewhere(db: str | Path, cell: dict) -> int:
    """How many earlier passing cells of this model and recipe ran with other settings (not compared)."""
    query = sa.select(sa.func.count()).select_from(CELLS).where(
        CELLS.c.model == cell["model"], CELLS.c.recipe == cell["recipe"], CELLS.c.status == "passed",
        CELLS.c.started_at < cell["started_at"], CELLS.c.fingerprint.is_distinct_from(cell["fingerprint"]))
    with connect(db).connect() as conn:
        return conn.execute(query).scalar()


def run_cells(db: str | Path, run_id: str) -> list[dict]:
    with connect(db).connect() as conn:
        return [with_scores(conn, dict(r._mapping)) for r in conn.execute(sa.select(CELLS).where(CELLS.c.run_id == run_id))]


def set_gate(db: str | Path, results: list[dict]) -> None:
    """What the nightly gate decided of each cell, kept beside it (the dashboard shows it)."""
    with writing(connect(db, create=True)) as conn:
        for r in results:
            conn.execute(sa.update(CELLS).where(CELLS.c.run_id == r["run_id"], CELLS.c.recipe == r["recipe"])
                         .values(gate=r["gate"], regressions=json.dumps(r["regressions"])))
