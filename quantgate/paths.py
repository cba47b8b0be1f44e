"""Where the project's own files are, and how a config's relative paths resolve: against the project root,
the folder holding pyproject.toml, from whatever folder quantgate runs in."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HISTORY_DB = PROJECT_ROOT / "runs" / "history.sqlite"
DASHBOARD = PROJECT_ROOT / "runs" / "dashboard.html"
RECIPES_DIR = PROJECT_ROOT / "configs" / "recipes"
DATA_DIR = PROJECT_ROOT / "data"  # the shipped evaluation and probe data (data/README.md)
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"

def rooted(path: Path) -> Path:
    """A config's relative path, resolved against the project root: the same files from any working directory."""
    return path if path.is_absolute() else PROJECT_ROOT / path


Rooted = Annotated[Path, AfterValidator(rooted)]


DATABASE_URLS = ("postgresql://", "postgresql+psycopg://")


def is_database_url(value) -> bool:
    return isinstance(value, str) and value.startswith(DATABASE_URLS)


def history_location(value):
    """A history database: a PostgreSQL URL as it is (its password refused: the config is saved with every run's
    record and passed to every nightly cell), otherwise a SQLite file's path, rooted."""
    if isinstance(value, str) and "://" in value and not is_database_url(value):
        raise ValueError(f"{value.split('://')[0]}:// is not a history database quantgate takes; allowed: "
                         "postgresql://USER@HOST[:PORT]/DB or a SQLite file's path")
    if not is_database_url(value):
        return rooted(Path(value))
    from sqlalchemy.engine import make_url

    url = make_url(value)
    if url.password is not None or "password" in url.query:
        raise ValueError("a password in the URL is refused (the config is saved with the run's record): give it "
                         "through PGPASSWORD or ~/.pgpass")
    return value


HistoryDb = Annotated[Path | str, BeforeValidator(history_location)]
