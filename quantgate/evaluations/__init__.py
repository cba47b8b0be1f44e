"""Evaluations: one module each, behind one small interface, as the backends are.

An evaluation declares its headline metric, which way is better and, where it scores items one by one, the
per-item field that is compared with the reference's item by item (a paired bootstrap and McNemar's test on the
flips). The evaluate step, the record, the report, the card, the history and the nightly gate read that
declaration, so adding one is one module here (its lm-eval task YAMLs in tasks/) and one `register` line. An
evaluation outside this package is a module named in QUANTGATE_EVALUATIONS (comma-separated).
"""
from __future__ import annotations

import importlib
import os
from typing import ClassVar

from quantgate.evaluations.stats import WEAK_MDE, paired_bootstrap


class Evaluation:
    """What the steps and the readers of the record need to know about one evaluation."""
    name: ClassVar[str]  # its key in the record's evaluate entry, the history and the config's messages
    label: ClassVar[str]  # what a person reads: "MMLU"
    metric: ClassVar[str]  # the headline field of its results: "acc"
    higher_is_better: ClassVar[bool] = True
    paired: ClassVar[str | None] = None  # the per-item field ({item: score}) compared with the reference's
    packages: ClassVar[tuple[str, ...]] = ()  # distributions it runs on (env.json, the gate's environment diff)
    fmt: ClassVar[str] = ".3f"

    def enabled(self, settings) -> bool:
        """Whether the run's evaluate settings ask for it."""
        return True

    def run(self, lm, tokenizer, settings, manager) -> dict:
        """Its results on an lm-eval model (`lm`), the per-item scores under `paired` included."""
        raise NotImplementedError

    def floor(self, lm, tokenizer, settings, manager, result: dict) -> dict | None:
        """The reference's own spread in its headline figure where how it is computed moves it (a recipe's delta
        inside it is no change): {"relative": ..., "how": ...}; None where not measured."""
        return None

    def compare(self, mine: dict, ref: dict, settings) -> dict:
        """What the record adds to a recipe's results against the reference's."""
        if self.paired:
            return paired_bootstrap(ref[self.paired], mine[self.paired], settings.bootstrap_iters)
        delta = mine[self.metric] - ref[self.metric]
        floor = ref.get("floor")
        return {f"delta_{self.metric}": delta,
                **({"within_floor": abs(delta) <= floor["relative"] * abs(ref[self.metric])} if floor else {})}

    def column(self) -> str:
        """The report's column header."""
        return f"{self.label} (delta [95% CI]; flips)" if self.paired else self.label

    def card_lines(self, mine: dict, ref: dict, recipe: str, settings: dict) -> list[str]:
        """The model card's paragraph on it."""
        value = f"reference {ref[self.metric]:{self.fmt}}, {recipe} {mine[self.metric]:{self.fmt}}"
        if not self.paired:
            return [f"{self.label}: {value}{floor_words(mine, ref)}."]
        low, high = mine["delta_ci95"]
        f = mine["flips"]
        return [f"{self.label}: {value}, delta {mine['delta_acc']:+.4f} [{low:+.4f}, {high:+.4f}] (significant: "
                f"{'yes' if mine['significant'] else 'no'}; {mine['paired_n']} items; {power_line(mine)}).", "",
                f"{self.label} answers that changed against the reference: {f['right_to_wrong']} right → wrong, "
                f"{f['wrong_to_right']} wrong → right (agreement {f['agreement']:.3f}; McNemar p = {f['mcnemar_p']:.3g})."]


def power_line(mine: dict, weak: float = WEAK_MDE) -> str:
    """`n=570: could detect a drop of 3.1 points or more at 80% power`, from a paired result, and where a drop of more
    than `weak` could go unseen, that its "no significant drop" is too weak to mean no drop."""
    if mine.get("mde") is None:
        return "power not measured"
    said = (f"n={mine['paired_n']}: could detect a drop of {100 * mine['mde']:.1f} points or more at "
            f"{mine['mde_power']:.0%} power" if mine["mde"] < 1
            else f"n={mine['paired_n']}: too few items to detect even a total drop")
    if not mine["significant"] and mine["mde"] > weak:
        said += f"; too weak for \"no significant drop\" to mean no drop (of {100 * weak:.0f} points)"
    return said


def floor_words(mine: dict, ref: dict) -> str:
    """`; within the reference's own spread (0.55%, ...): no change`, where the reference's floor was measured."""
    floor = ref.get("floor") or {}
    if "within_floor" not in mine or not floor.get("relative"):  # exact: any change is one, nothing to add
        return ""
    return (f"; {'within' if mine['within_floor'] else 'outside'} the reference's own spread ({100 * floor['relative']:.2g}%, "
            f"{floor['how']}){': no change' if mine['within_floor'] else ''}")


EVALUATIONS: dict[str, Evaluation] = {}
BUILTIN = ("mmlu", "humaneval", "wikitext")  # modules of this package, in the report's column order


def register(evaluation: Evaluation) -> Evaluation:
    EVALUATIONS[evaluation.name] = evaluation
    return evaluation


def registered() -> list[Evaluation]:
    return list(EVALUATIONS.values())


def enabled(settings) -> list[Evaluation]:
    return [e for e in EVALUATIONS.values() if e.enabled(settings)]


def packages() -> list[str]:
    return list(dict.fromkeys(p for e in EVALUATIONS.values() for p in e.packages))


for _module in ([f"quantgate.evaluations.{name}" for name in BUILTIN]
                + os.environ.get("QUANTGATE_EVALUATIONS", "").split(",")):
    if _module.strip():
        importlib.import_module(_module.strip())
