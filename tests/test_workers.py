"""Recipes side by side (flows.workers): a step in a worker process of its own, its result, its log records, its
prints and its exception brought back; the process-wide state a model load changes stays in the worker; recipes
gated at once overlap in time, each in its own process, and a stop ends every worker."""
import logging
import os
import time
from types import SimpleNamespace

import pytest
import torch
from pydantic import BaseModel

from flows.workers import Worker, WorkerGone, _current, _live, each_recipe, in_worker, leave_worker, renew_worker


class Answer(BaseModel):
    pid: int
    dtype: str


def loads_a_model(dtype: str) -> Answer:
    """What transformers' from_pretrained does to the process: the default dtype set, for the length of a load."""
    torch.set_default_dtype(getattr(torch, dtype))
    logging.getLogger("quantgate.test").info("loaded in %s", dtype)
    print("a library's print")
    return Answer(pid=os.getpid(), dtype=str(torch.get_default_dtype()))


class Stubborn(Exception):
    def __init__(self, a, b):  # two required arguments: pickle cannot rebuild it
        super().__init__(f"{a} and {b}")


def raises(kind: str):
    if kind == "value":
        raise ValueError("the recipe's block size 96 does not divide 1536")
    raise Stubborn("one", "two")


def exits():
    os._exit(3)  # as the kernel's OOM killer would end it


def spans(seconds: float) -> tuple[int, float, float]:
    start = time.time()
    time.sleep(seconds)
    return os.getpid(), start, time.time()


@pytest.fixture
def worker():
    w = Worker("int8")
    yield w
    w.close()


def test_a_step_in_a_worker_returns_its_typed_result_and_its_logs_and_leaves_this_process_as_it_was(worker, caplog):
    caplog.set_level(logging.INFO)
    answer = worker.call(loads_a_model, ("float64",), {})
    assert isinstance(answer, Answer) and answer.pid != os.getpid() and answer.dtype == "torch.float64"
    assert torch.get_default_dtype() == torch.float32  # the worker's load changed the worker's state only
    records = {(r.name, r.getMessage()) for r in caplog.records}
    assert ("quantgate.test", "loaded in float64") in records
    assert ("output", "stdout: a library's print") in records
    assert worker.call(loads_a_model, ("float32",), {}).pid == answer.pid  # the recipe's next step: the same process


def test_a_renewed_worker_runs_the_recipes_next_step_in_a_new_process(worker):
    token = _current.set(worker)
    try:
        step = in_worker(loads_a_model)
        first = step("float32").pid
        renew_worker()  # after a step that may have left its process unusable
        second = step("float32").pid
        assert first != second != os.getpid() and _current.get() is worker  # still the recipe's worker, anew
    finally:
        _current.reset(token)


def test_a_steps_exception_comes_back_with_its_type_or_named_where_it_does_not_pickle(worker):
    with pytest.raises(ValueError, match="block size 96"):
        worker.call(raises, ("value",), {})
    with pytest.raises(RuntimeError, match=r"^Stubborn: one and two$"):
        worker.call(raises, ("stubborn",), {})


def test_a_worker_that_dies_mid_step_is_an_error_and_the_next_call_gets_a_fresh_one(worker):
    first = worker.call(spans, (0,), {})[0]
    with pytest.raises(WorkerGone, match=r"int8's worker process ended \(exit code 3\)"):
        worker.call(exits, (), {})
    assert worker.call(spans, (0,), {})[0] != first


def test_recipes_at_once_overlap_each_in_its_own_process_and_one_at_a_time_stays_here():
    timed = in_worker(spans)
    recipes = [SimpleNamespace(name=n) for n in ("int8", "nf4", "fp8")]
    seen = {}
    each_recipe(recipes, 2, lambda recipe: seen.__setitem__(recipe.name, timed(2.0)))
    pids = {pid for pid, _, _ in seen.values()}
    assert len(pids) == 3 and os.getpid() not in pids  # a fresh process per recipe
    (_, s1, e1), (_, s2, e2) = seen["int8"], seen["nf4"]
    assert s2 < e1 and s1 < e2  # the first two ran at once
    assert seen["fp8"][1] >= min(e1, e2) - 0.1  # the third waited for a place
    assert not _live
    here = {}
    each_recipe(recipes[:2], 1, lambda recipe: here.__setitem__(recipe.name, timed(0)))
    assert {pid for pid, _, _ in here.values()} == {os.getpid()}


def test_first_runs_beside_the_recipes_in_a_worker_it_can_leave_for_what_follows():
    """The reference's steps beside the recipes: its step in a worker of its own, its benchmark here once it has left
    the worker (which ends then, not after the benchmark)."""
    timed = in_worker(spans)
    seen = {}

    def first():
        seen["reference"], mine = timed(0), _current.get()
        leave_worker()
        seen["ended"] = mine.process is None and mine not in _live
        seen["benchmark"] = timed(0)

    each_recipe([SimpleNamespace(name="int8")] * 2, 2, lambda recipe: timed(1.0), first=first)
    assert seen["reference"][0] != os.getpid() and seen["ended"] and seen["benchmark"][0] == os.getpid()
    assert not _live


def test_a_stop_ends_every_worker_and_the_recipes_not_begun():
    slow = in_worker(spans)
    started = []

    def gate(recipe):
        started.append(recipe.name)
        if recipe.name == "int8":
            time.sleep(3)  # the other recipe's worker is busy by then
            raise KeyboardInterrupt
        slow(60)

    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        each_recipe([SimpleNamespace(name=n) for n in ("int8", "nf4", "fp8")], 2, gate)
    assert time.perf_counter() - t0 < 30 and not _live
    assert "fp8" not in started


def test_within_a_run_steps_share_and_a_timed_step_waits_for_them_then_holds_back_new_ones():
    import contextlib
    import threading

    from flows.devices import Turns

    turns, spans = Turns(), {}

    def step(name, timed, seconds, after=0.0):
        time.sleep(after)
        with turns.shared(), turns.upgraded() if timed else contextlib.nullcontext():
            start = time.monotonic()
            time.sleep(seconds)
            spans[name] = (start, time.monotonic())

    calls = [("validate-a", False, 1.0), ("validate-b", False, 1.0), ("benchmark", True, 1.0, 0.2),
             ("evaluate-c", False, 0.2, 0.5)]  # c arrives while the benchmark waits
    threads = [threading.Thread(target=step, args=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    a, b, bench, c = (spans[name] for name in ("validate-a", "validate-b", "benchmark", "evaluate-c"))
    assert a[0] < b[1] and b[0] < a[1]  # shared
    assert bench[0] >= max(a[1], b[1]) and c[0] >= bench[1]  # alone, and ahead of the step that came after it


def test_a_timed_step_shares_the_run_while_it_prepares_and_has_it_alone_while_it_measures():
    import threading

    from flows.devices import Devices, Hold

    spans = {}

    def step(name, seconds, after=0.0):
        time.sleep(after)
        with Hold(Devices(), name, "validate"):
            start = time.monotonic()
            time.sleep(seconds)
            spans[name] = (start, time.monotonic())

    def benchmark():
        with Hold(Devices(), "bench", "benchmark") as hold:
            spans["prepare"] = (time.monotonic(),)
            time.sleep(0.5)  # loads and compiles beside validate-a
            with hold.alone():
                start = time.monotonic()
                time.sleep(1.0)
                spans["alone"] = (start, time.monotonic())
            spans["after"] = (time.monotonic(),)  # shares again: the memory of quantizing while loading

    calls = [(step, ("validate-a", 1.5)), (benchmark, ()), (step, ("evaluate-c", 0.5, 1.0))]
    threads = [threading.Thread(target=fn, args=args, daemon=True) for fn, args in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a step never got its turn"
    a, alone, c = spans["validate-a"], spans["alone"], spans["evaluate-c"]
    assert spans["prepare"][0] < a[1]  # prepared beside a step in flight
    assert alone[0] >= a[1] and c[0] >= alone[1]  # measured alone; c, arriving meanwhile, waited behind it
    assert spans["after"][0] >= alone[1]


def timed_out(worker, fn, args: tuple, seconds: float) -> tuple[BaseException | None, float]:
    """worker.call(fn, *args) in a thread under Prefect's timeout, as a task run in a recipe's thread is (Prefect raises
    TimeoutError into the thread, its cancel scope): what it raised, and after how long."""
    import threading

    from prefect.utilities.timeout import timeout

    seen = {}

    def call():
        t0 = time.monotonic()
        try:
            with timeout(seconds):
                worker.call(fn, args, {})
        except BaseException as e:  # noqa: BLE001 - what the caller asserts on
            seen["error"] = e
        seen["after"] = time.monotonic() - t0

    thread = threading.Thread(target=call)
    thread.start()
    thread.join(60)
    return seen.get("error"), seen.get("after", float("inf"))


def test_a_timeout_in_the_recipes_thread_ends_the_step_and_its_worker(worker):
    """The wait for the worker must give way, and the worker, mid-step, must go."""
    error, after = timed_out(worker, spans, (60,), 1.0)
    assert isinstance(error, TimeoutError) and after < 5 and worker.process is None


def starts_a_child(pid_file: str) -> None:
    """A step that starts a process of its own, as the benchmark's measurement is, and waits."""
    import subprocess

    child = subprocess.Popen(["sleep", "120"])
    with open(pid_file, "w") as f:
        f.write(str(child.pid))
    time.sleep(120)


def test_a_worker_ended_mid_step_takes_the_processes_it_started_with_it(worker, tmp_path):
    import psutil

    pid_file = tmp_path / "child.pid"
    worker.call(os.getpid, (), {})  # started and answering: the timeout's 3 s are the step's (a loaded host took them)
    error, _ = timed_out(worker, starts_a_child, (str(pid_file),), 3.0)
    assert isinstance(error, TimeoutError)
    child = int(pid_file.read_text())
    gone = not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert gone and worker.process is None


def test_one_recipes_error_leaves_the_others_to_finish_and_is_raised_once_they_have():
    timed = in_worker(spans)
    finished = {}

    def gate(recipe):
        if recipe.name == "int8":
            raise ValueError("int8's record could not be written")
        finished[recipe.name] = timed(1.0)

    with pytest.raises(ValueError, match="record could not be written"):
        each_recipe([SimpleNamespace(name=n) for n in ("int8", "nf4", "fp8")], 2, gate)
    assert set(finished) == {"nf4", "fp8"} and not _live


def test_a_stop_reaches_a_step_waiting_for_its_turn_and_a_step_about_to_start():
    import threading

    from flows.devices import Turns
    from quantgate.runlog import Stopped, raise_if_signalled, stop_requested

    turns, outcome = Turns(), {}

    def benchmark():
        try:
            with turns.shared(), turns.upgraded():
                outcome["benchmark"] = "timed"
        except Stopped as e:
            outcome["benchmark"] = f"stopped after {time.monotonic() - t0:.1f} s: {e}"

    with turns.shared():  # a step in flight, and a benchmark waiting for it
        t0 = time.monotonic()
        thread = threading.Thread(target=benchmark)
        thread.start()
        time.sleep(1)
        stop_requested.set()
        try:
            thread.join(10)
            with pytest.raises(Stopped, match="the run is stopping"):
                raise_if_signalled()  # as run_step does before a step: a publish does not start
        finally:
            stop_requested.clear()
    assert outcome["benchmark"].startswith("stopped after") and float(outcome["benchmark"].split()[2]) < 3


@pytest.mark.integration  # a whole flow, with a Prefect server
def test_two_recipes_at_once_gate_side_by_side_each_in_its_process_and_the_benchmarks_time_alone(
        tiny_llama, cache_dir, prefect_server, tmp_path, monkeypatch):
    import json
    import re
    import threading
    from datetime import datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId, TaskRunFilter, TaskRunFilterName

    import flows.quantize_model as flow
    from tests.conftest import QUICK, run_flow

    recipes = ("torchao-int8-weight-only", "quanto-int8")
    # The reference's benchmark held back until a recipe's benchmark has begun: that one measures without its figures.
    recipe_benchmark_began, began_before = threading.Event(), []
    now, benchmark_reference = flow.Model.reference_benchmark_now, flow.benchmark_reference

    def reference_benchmark_now(model):
        began_before.append((found := now(model)) is None)
        recipe_benchmark_began.set()
        return found

    def held_back(run, config, model):
        recipe_benchmark_began.wait(300)
        benchmark_reference(run, config, model)

    monkeypatch.setattr(flow.Model, "reference_benchmark_now", reference_benchmark_now)
    monkeypatch.setattr(flow, "benchmark_reference", held_back)
    run_dir, shown, code = run_flow(tmp_path / "runs", cache_dir, [
        f"model.source={tiny_llama}", "model.dtype=float32", *QUICK, "model.recipes_at_once=2",
        f"recipes=[{', '.join(recipes)}]"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert code == 0 and metrics["status"] == "passed", shown

    def span(step: dict) -> tuple[float, float]:
        start = datetime.fromisoformat(step["started_at"]).timestamp()
        return start, start + step["seconds"]

    steps = {(r, s): span(v) for r in recipes for s, v in metrics["recipes"][r]["steps"].items() if v.get("started_at")}
    a, b = steps[(recipes[0], "quantize")], steps[(recipes[1], "quantize")]
    assert a[0] < b[1] and b[0] < a[1]  # side by side
    # The reference measured beside the recipes' quantize; each recipe's validate waits for it.
    reference = span(metrics["reference"])
    assert reference[0] < max(a[1], b[1]) and min(a[0], b[0]) < reference[1]
    assert all(steps[(r, "validate")][0] >= reference[1] - 0.05 for r in recipes)
    # A recipe whose quantize ended while the reference was measured made its generations then, and validate took them.
    for r in recipes:
        entry = metrics["recipes"][r]
        if "generate" in entry["steps"]:
            assert entry["steps"]["generate"]["status"] == "ok" and steps[(r, "generate")][0] < reference[1]
            assert entry["validate"]["generated_before"] is True
        else:
            assert steps[(r, "quantize")][1] >= reference[1] - 1, r
    # Each benchmark loads sharing the device and times alone: no other step of the run, nor another's time alone,
    # within its time alone (another benchmark's step may be loading before it, or waiting for its turn).
    alone = {r: span(metrics["recipes"][r]["benchmark"]["alone"]) for r in recipes}
    for recipe, (start, end) in alone.items():
        others = [v for (_, step), v in steps.items() if step != "benchmark"]
        others += [v for r, v in alone.items() if r != recipe]
        assert all(e <= start + 0.05 or s >= end - 0.05 for s, e in others), (recipe, start, end)

    # The first recipe's benchmark began before the reference's had ended, and was compared with it after.
    assert began_before[0] is True
    assert all(metrics["recipes"][r]["benchmark"]["latency"]["speedup_vs_reference"] > 0 for r in recipes)

    log = (run_dir / "run.log").read_text()
    pids = {r: re.search(rf"quantgate.workers: {re.escape(r)}: worker process (\d+) started", log) for r in recipes}
    assert all(pids.values()) and len({m.group(1) for m in pids.values()}) == 2
    # A record logged in the worker: in the run's log, and in the task run's logs in Prefect.
    assert "quantgate: evaluate quanto-int8:" in log
    with get_client(sync_client=True) as client:
        named = TaskRunFilter(name=TaskRunFilterName(any_=["evaluate-quanto-int8"]))
        task_run = client.read_task_runs(task_run_filter=named)
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run[-1].id])))
    assert any(entry.message.startswith("evaluate quanto-int8:") for entry in logs), [e.message for e in logs]


def starts_and_signals_a_child() -> int:
    """What a benchmark's process does with SIGTERM when the worker started it: the default, it ends."""
    import signal
    import subprocess

    child = subprocess.Popen(["sleep", "60"])
    child.send_signal(signal.SIGTERM)
    return child.wait(10)


def test_a_worker_ignores_sigterm_but_what_it_starts_does_not(worker):
    import signal

    assert worker.call(spans, (0,), {})  # started
    os.kill(worker.process.pid, signal.SIGTERM)  # as a SIGTERM to the run's process group reaches it
    time.sleep(0.5)
    assert worker.process.is_alive()
    assert worker.call(starts_and_signals_a_child, (), {}) == -signal.SIGTERM


def gives_way_between_units(units: int, seconds: float, started: str) -> list[tuple[float, float]]:
    """A long step's units of work, each after a point where it gives way (quantgate.sharing): when each ran."""
    from pathlib import Path

    from quantgate.sharing import give_way

    Path(started).touch()
    ran = []
    for _ in range(units):
        give_way()
        start = time.time()
        time.sleep(seconds)
        ran.append((start, time.time()))
    return ran


def test_a_long_step_in_a_worker_gives_way_at_its_next_point_while_a_benchmark_of_the_run_times(worker, tmp_path):
    import threading

    from flows.devices import TURNS, Devices, Hold

    started, seen = tmp_path / "started", {}

    def validate():
        with Hold(Devices(), "int8", "validate"):
            seen["units"] = worker.call(gives_way_between_units, (16, 0.25, str(started)), {})

    def benchmark():
        while not started.exists():
            time.sleep(0.05)
        time.sleep(0.6)  # the step is mid-way: 4 s of units, 3.4 s of them left
        with Hold(Devices(), "bench", "benchmark") as hold:
            asked = time.time()
            with hold.alone():
                start = time.time()
                time.sleep(1.0)
                seen["alone"] = (asked, start, time.time())

    threads = [threading.Thread(target=fn, daemon=True) for fn in (validate, benchmark)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a step never got its turn"
    (asked, start, end), units = seen["alone"], seen["units"]
    assert start - asked < 1.0  # at most one unit's wait, not the step's 3.4 s left
    assert not [u for u in units if u[0] < end and u[1] > start]  # no unit ran while it timed
    assert units[-1][1] > end and len(units) == 16  # the step went on after it, and did all its work
    assert not TURNS.wanted.is_set() and TURNS.sharing == 0 and not TURNS.alone


def test_a_step_gives_way_only_where_its_orchestrator_said_how():
    from quantgate import sharing

    calls = []
    sharing.give_way()  # nothing set: nothing happens
    try:
        sharing.ways_to_give(lambda: False, lambda: calls.append("gave"))
        sharing.give_way()
        sharing.ways_to_give(lambda: True, lambda: calls.append("gave"))
        sharing.give_way()
    finally:
        sharing.ways_to_give(None, None)
    assert calls == ["gave"]


def test_a_generation_gives_way_after_each_token(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate import drift, sharing

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)
    asked = []
    try:
        sharing.ways_to_give(lambda: True, lambda: asked.append(1))
        texts = drift.generate(model, tokenizer, [{"id": "p", "text": "The tower", "chat": False}], max_new_tokens=6)
    finally:
        sharing.ways_to_give(None, None)
    assert len(texts) == 1 and len(asked) == 6  # once a token, none stopped early
