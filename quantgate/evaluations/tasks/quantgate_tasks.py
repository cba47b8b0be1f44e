"""The functions quantgate's lm-eval task files name with `!function`: each task's documents from the project's
data/ (no Hub), MMLU's prompt and HumanEval's scoring; WikiText-2's document functions are lm-eval's own."""
from __future__ import annotations

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401

from quantgate.evaluations import humaneval, mmlu, wikitext


def mmlu_subject(subject: str, **_):
    # Each subject reads its own questions: a filter per subject over all 14,042 cost about 6 s a model.
    return {split: _dataset(mmlu.questions(split)[subject]) for split in ("test", "dev")}


def mmlu_prompt(doc):
    # lm-eval's mmlu/default doc_to_text, as Python: its Jinja string is compiled again for every question.
    a, b, c, d = doc["choices"]
    return f"{doc['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"


def wikitext_pages(**_):
    return {"test": _dataset([{"page": page} for page in wikitext.documents()])}


def humaneval_problems(**_):
    return {"test": _dataset(humaneval.problems())}


def humaneval_result(doc, results):
    # The prompt, the model's greedy completion and the problem's tests, run in quantgate's sandbox.
    from quantgate.sandbox import passes

    program = doc["prompt"] + results[0] + "\n\n" + doc["test"] + f"\ncheck({doc['entry_point']})\n"
    return {"pass@1": float(passes(program))}


def _dataset(rows: list[dict]):
    import hashlib
    import json

    import datasets
    from datasets.table import InMemoryTable

    # Its fingerprint from the rows themselves: datasets' own hashes the Arrow table with dill, which fails under
    # Python 3.12 ("Can't pickle <class 'MonthDayNano'>", seen on the GPU machine with datasets 5.2 and pyarrow 24-26).
    fingerprint = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return datasets.Dataset(InMemoryTable.from_pylist(rows), fingerprint=fingerprint)
