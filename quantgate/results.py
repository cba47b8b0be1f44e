"""What each step returns: a typed result. The fields a later step or the flow reads are declared; the rest of a
step's measurements ride along as extra fields, which the record keeps as they are (`figures`)."""
from __future__ import annotations

import warnings
from typing import Literal

from pydantic import BaseModel, ConfigDict

Status = Literal["ok", "failed", "skipped", "error", "not_run"]
OUTCOME = ("status", "reason", "seconds", "started_at", "cached", "warnings")  # how a step ended, not what it measured


class Measurements(BaseModel):
    """Declared fields for what a later step reads; the rest ride along as extras the record keeps."""
    model_config = ConfigDict(extra="allow")


class StepResult(Measurements):
    status: Status = "ok"
    reason: str | None = None
    warnings: list[str] = []
    seconds: float | None = None  # set by the runner
    started_at: str | None = None  # set by the runner: UTC, when the step's work began (after its device was free)
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def record(self) -> dict:
        """The whole result as the record keeps a model's own step: how it ended and what it measured."""
        return {"status": self.status, **self.model_dump(mode="json", exclude_unset=True)}

    def figures(self) -> dict:
        """What the step measured, as the record keeps it: the fields it set, without how it ended."""
        return {k: v for k, v in self.model_dump(mode="json", exclude_unset=True).items() if k not in OUTCOME}

    def view(self) -> dict:
        """How the step ended, for the record's `steps` entry. A step that could not run here is not_run."""
        view = {"status": "not_run" if self.status == "skipped" else self.status, "seconds": self.seconds}
        if self.started_at is not None:
            view["started_at"] = self.started_at
        if self.reason is not None:
            view["reason"] = self.reason
        if "cached" in self.model_fields_set:  # set by the runner (Prefect's cache), for every step it ran
            view["cached"] = self.cached
        return view


class Downloaded(StepResult):
    checkpoint: str | None = None
    source: str | None = None
    revision: str | None = None
    checkpoint_sha256: str | None = None
    base_model: str | None = None
    license: str | None = None


class ReferenceValidation(Measurements):
    """The reference's measurements on the validation prompts, cached at `path` (plain tensors)."""
    path: str
    cached: bool
    nonfinite: dict | None = None
    overflow: dict | None = None  # an output past the range of the dtype the checkpoint is served in
    first_nonfinite_module: str | None = None
    towers: dict | None = None  # the image and audio prompts' measurements, for a multimodal model
    long: dict | None = None  # the long sequences' (quantgate/longrange.py), where measured


class ReferenceEvaluation(Measurements):
    """The reference's evaluation summary; its per-item results are in the file at `path`."""
    path: str | None = None
    cached: bool = False
    not_run: str | None = None


with warnings.catch_warnings():
    # The measurements are called validate and evaluate; pydantic's deprecated BaseModel.validate is the only clash.
    warnings.simplefilter("ignore", UserWarning)

    class Reference(StepResult):
        real_bytes: int | None = None
        dtype: str | None = None
        compute_dtype: str | None = None
        validate: ReferenceValidation | None = None
        evaluate: ReferenceEvaluation | None = None
        adapters: dict | None = None  # per served adapter, the reference with it on top (tasks/reference.py)


class Quantized(StepResult):
    checkpoint: str | None = None
    real_bytes: int | None = None


class Generated(StepResult):
    """A recipe's own generations from the validation prompts, made while the reference was still being measured
    (tasks/validate generate): the file that holds them, which validate reads instead of generating."""
    path: str | None = None


class Validated(StepResult):
    verdict: Literal["pass", "warn", "fail"] | None = None
    reasons: list[str] = []


class Evaluated(StepResult):
    adapters: dict | None = None  # per served adapter, its evaluations with it against the reference with it


class Benchmarked(StepResult):
    latency: dict | None = None
    memory: dict | None = None
    copy_bandwidth: float | None = None
    adapters: dict | None = None  # per served adapter, the model measured again with it on top


class AdaptersChecked(StepResult):
    """Per served adapter, the recipe's base with it on top against the reference with it (tasks/adapters.py)."""
    adapters: dict = {}


class Published(StepResult):
    location: str | None = None
    approval: str | None = None  # who approved a Hub upload, where steps.publish.approve asked


class Remedied(StepResult):
    """Which modules cause a recipe's drift (quantgate.attribution, None where its text drift passes), the variants
    to gate, then (set by whoever gates them: tasks/remedy.gate) what each measured and the recipe that passed, as
    the run's config holds recipes, written to `file`; None where none did within the budget."""
    attribution: dict | None = None
    search: dict | None = None
    variants: list[dict] = []
    budget: int | None = None
    gated: dict | None = None
    recipe: dict | None = None
    file: str | None = None
