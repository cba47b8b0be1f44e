"""WikiText-2 word perplexity through lm-eval's rolling windows, over the leading articles of the test split that
fit a token budget (data/wikitext2)."""
from __future__ import annotations

import functools
import math
import re
import time

from quantgate.evaluations import Evaluation, floor_words, register
from quantgate.paths import DATA_DIR


@functools.cache
def documents() -> tuple[str, ...]:
    """The test split cut into its articles (the `page` documents lm-eval's task reads)."""
    docs, current = [], []
    for line in (DATA_DIR / "wikitext2" / "test.txt").read_text().split("\n"):
        if re.match(r"^ = [^=].* = $", line) and current:
            docs.append("\n".join(current) + "\n")
            current = []
        if line.strip() or current:
            current.append(line)
    docs.append("\n".join(current) + "\n")
    return tuple(docs)


def limit(tokenizer, budget: int | None) -> int | None:
    """How many leading documents fit in a token budget (at least one); None: all of them."""
    if budget is None:
        return None
    total = 0
    for count, doc in enumerate(documents()):
        total += len(tokenizer(doc)["input_ids"])
        if total > budget:
            return max(count, 1)
    return None


def windows(tokenizer, settings, max_length: int) -> int:
    """How many rolling windows of max_length tokens lm-eval scores over the documents the settings take."""
    docs = documents()[:limit(tokenizer, settings.wikitext_token_budget)]
    return sum(math.ceil(len(tokenizer(doc)["input_ids"]) / max_length) for doc in docs)


class WikiText(Evaluation):
    name, label, metric, higher_is_better, fmt = "wikitext", "word ppl", "word_perplexity", False, ".2f"

    def enabled(self, settings) -> bool:
        return settings.wikitext

    def run(self, lm, tokenizer, settings, manager) -> dict:
        from lm_eval import simple_evaluate

        start = time.perf_counter()
        if str(settings.batch_size).startswith("auto"):  # lm-eval's probe of rolling windows: full-length forwards
            lm.batch_size_per_gpu = 1  # a max_length window is a forward's worth on its own
        wiki = simple_evaluate(model=lm, tasks=["quantgate_wikitext"], task_manager=manager, bootstrap_iters=0,
                               limit=limit(tokenizer, settings.wikitext_token_budget))
        r = wiki["results"]["quantgate_wikitext"]
        return {"word_perplexity": r["word_perplexity,none"], "byte_perplexity": r["byte_perplexity,none"],
                "bits_per_byte": r["bits_per_byte,none"], "documents": wiki["n-samples"]["quantgate_wikitext"]["effective"],
                "seconds": round(time.perf_counter() - start, 1)}

    def floor(self, lm, tokenizer, settings, manager, result: dict) -> dict:
        """Windows one at a time (under auto), or a single window, are computed alike in every run, the recipe's too:
        exact. Batched, the batch's shape moves the sums in a half dtype (docs/evaluation.md), so the same windows one
        at a time measure how far."""
        batch = lm.batch_size_per_gpu
        if batch == 1 or windows(tokenizer, settings, lm.max_length) <= 1:
            return {"relative": 0.0, "how": "exact: its windows one at a time, as the recipe's"}
        lm.batch_size_per_gpu = 1
        try:
            alone = self.run(lm, tokenizer, settings, manager)["word_perplexity"]
        finally:
            lm.batch_size_per_gpu = batch
        return {"relative": abs(result["word_perplexity"] - alone) / alone,
                "how": f"its windows in batches of {batch} against one at a time, {alone:.4f}"}

    def card_lines(self, mine: dict, ref: dict, recipe: str, settings: dict) -> list[str]:
        return [f"WikiText-2 word perplexity ({mine['documents']} articles): reference {ref['word_perplexity']:.3f}, "
                f"{recipe} {mine['word_perplexity']:.3f}{floor_words(mine, ref)}."]


register(WikiText())
