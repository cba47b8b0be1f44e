"""quantgate plan | run | report | remedy | history | dashboard | approve | publish-adapter | alerts — the command line."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

# Prefect shows these loggers' records in the UI and on the terminal.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "quantgate")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no network to send it to

from quantgate import runlog, watchdog  # noqa: E402
from quantgate.history import HistoryError  # noqa: E402
from quantgate.config import ConfigError, load_config, writable  # noqa: E402
from quantgate.files import slug, write_json  # noqa: E402
from quantgate.formats import num  # noqa: E402
from quantgate.paths import DASHBOARD, DEFAULT_CONFIG, HISTORY_DB, PROJECT_ROOT, history_location, rooted  # noqa: E402


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plan(args) -> int:
    from quantgate import adapters
    from quantgate.backends import backend_of
    from quantgate.plan import (checkpoint_bytes, make_plans, placement_lines, planned_placement, skeleton_of, summarize,
                                tower_lines, towers)

    config = load_config(args.config, args.set)
    skeleton = skeleton_of(config, args.config)  # read once: the plans and the placement both use it
    plans = make_plans(config, args.config, skeleton)
    if args.json:
        print(json.dumps(plans, indent=2))
        return 0
    print(f"model: {config.model.source} ({config.model.dtype}); plans made on the meta-device skeleton")
    if config.model.max_memory:
        print("\n".join(placement_lines(planned_placement(skeleton[1], config))))
    rows = []
    for recipe in config.recipes:
        counts, backend = summarize(plans[recipe.name]), backend_of(recipe)
        weights = None if backend.given else checkpoint_bytes(skeleton[1], plans[recipe.name], config.model.dtype,
                                                              backend.stored_bits(recipe))
        rows.append([recipe.name, counts["quantized"], counts["skipped"], counts["fallback"],
                     f"{weights / 1e9:.2f} GB" if weights is not None else "fetched as published"])
    print(_table(["recipe", "quantized", "skipped", "fallback", "weights on disk (estimate)"], rows))
    for name, entries in plans.items():
        # Layers repeat: group them as model.layers.*.mlp.up_proj (x30) per reason.
        groups: dict[tuple, int] = {}
        for entry in entries:
            if entry["status"] != "quantized":
                key = (entry["status"], re.sub(r"\.\d+\.", ".*.", entry["module"]), entry["reason"])
                groups[key] = groups.get(key, 0) + 1
        for (status, module, reason), count in groups.items():
            print(f"  {name}: {status} {module}" + (f" (x{count})" if count > 1 else "") + f": {reason}")
        for line in tower_lines(towers(entries)):
            print(f"  {name}: {line}")
    for spec in config.adapters:  # checked by make_plans: each one's folder is there and fits the model
        print(f"adapter {spec.name}: {adapters.describe(adapters.fetch(spec.source, config.output.cache_dir))}")
    return 0


def run(args) -> int:
    from quantgate.report import summary_header, summary_rows
    from quantgate.terminal import quiet

    from quantgate.plan import make_plans

    # A bad config, a model that does not fit or an unwritable output path fails here, before Prefect starts.
    config = load_config(args.config, args.set)
    make_plans(config, args.config)
    writable(config, args.config)
    # Imported before the terminal is quieted: Prefect sets up its console handler on import, and
    # quiet() mutes the handlers it finds.
    from flows.quantize_model import quantize_model

    # Outlives a SIGKILL of this process: stops what it started and settles its record (quantgate.watchdog).
    dog = watchdog.start(config.output.runs_dir, config.output.history_db, config.steps.publish.registry_dir)
    try:
        with quiet():
            state = quantize_model(config_path=str(args.config), overrides=args.set, return_state=True)
        result = state.result(raise_on_failure=False)  # Failed: a run whose verdict is not passed, its folder
        if isinstance(result, BaseException):
            raise result
        run_dir = Path(result)
    except KeyboardInterrupt as stop:  # the flow has marked its run interrupted; its helpers must not outlive it
        # Prefect stops its temporary server as this process exits, once its logs and events are delivered;
        # stopped first, the delivery waited on a dead server for over a minute.
        stopped = runlog.stop_children(spare=prefect_server)
        print(f"\nstopped ({stop or 'SIGINT'}): the run is marked interrupted; {stopped} child processes stopped",
              file=sys.stderr)
        return 143 if isinstance(stop, runlog.Stopped) else 130
    finally:
        dog.terminate()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print()
    print(_table(summary_header(), summary_rows(metrics)))
    if metrics.get("base_broken"):
        print(f"\n{metrics['base_broken']}: no recipe was gated")
    print(f"\nrun {metrics['run_id']}: {metrics['status']}")
    print(f"run directory: {run_dir}")
    return 0 if metrics["status"] == "passed" else 1


def prefect_server(process) -> bool:
    """Whether a child process is the temporary Prefect server this run started."""
    return "prefect.server.api.server:create_app" in " ".join(process.cmdline())


def report(args) -> int:
    from quantgate.card import render_card
    from quantgate.report import write_report

    run_dir = args.run_dir
    if not (run_dir / "metrics.json").is_file():
        print(f"{run_dir}: not a run directory (no metrics.json)", file=sys.stderr)
        return 2
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        write_report(run_dir, metrics)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # cut short, or a run that never got that far
        print(f"{run_dir / 'metrics.json'}: not a complete run record ({type(e).__name__}: {e}); nothing rendered",
              file=sys.stderr)
        return 2
    for name, entry in metrics["recipes"].items():
        if "quantize" in entry:
            where = entry.get("publish", {}).get("location") or str(run_dir / name / "checkpoint")
            forced = bool(entry.get("publish", {}).get("forced"))
            (run_dir / name / "card.md").write_text(render_card(run_dir, name, where, forced=forced))
            print(f"card: {run_dir / name / 'card.md'}")
    print(f"report: {run_dir / 'report.md'}")
    return 0


def show_history(args) -> int:
    from quantgate import history
    from quantgate.formats import num
    from quantgate.settle import settle

    if isinstance(args.db, Path) and args.db.is_file():  # runs a killed process left `running` beside the history read as what they are
        for run_id in settle(args.db.parent, args.db):
            print(f"run {run_id}: killed before it finished; its record now says so", file=sys.stderr)

    rows = history.cells(args.db, model=args.model, recipe=args.recipe, status=args.status, limit=args.limit)
    print(_table(["run", "model", "recipe", "status", "verdict", "KL mean", "MMLU delta", "peak GB", "decode ms"],
                 [[r["run_id"], r["model"], r["recipe"], r["status"], r["verdict"] or "–", num(r["kl_mean"], ".4f"),
                   num(r["mmlu_delta"], "+.4f"), num(r["peak_memory"] and r["peak_memory"] / 1e9, ".3f"),
                   num(r["decode_ms"], ".2f")] for r in rows]))
    return 0


def write_dashboard(args) -> int:
    from quantgate import dashboard

    print(f"dashboard: {dashboard.write(args.db, args.out)}")
    return 0


def remedy(args) -> int:
    """Attribution and the variants (the remedy step), each quantized and validated for real until one passes; the
    libraries' output goes to <recipe>/remedy.log, each measurement to the terminal."""
    import contextlib
    import logging

    from quantgate.terminal import LogStream
    from tasks import remedy as step

    run_facts = step.facts(args.run_dir, args.recipe)
    out = args.run_dir / args.recipe
    shown = logging.StreamHandler(sys.stderr)
    shown.setFormatter(logging.Formatter("  %(message)s"))
    logger = logging.getLogger("quantgate.remedy")
    with runlog.to_file(out / "remedy.log"), contextlib.redirect_stderr(LogStream("output")):
        logger.addHandler(shown)
        try:
            found = step.remedy(*run_facts, args.top, args.budget)
            found = step.conclude(found, _gate(found, *run_facts[:2], out), run_facts[0], out / "remedy.yaml",
                                  f"quantgate remedy {args.run_dir} {args.recipe}")
        finally:
            logger.removeHandler(shown)
    write_json(out / "remedy.json", found.model_dump(mode="json"))
    print(_remedy_tables(found.model_dump(mode="json")))
    print(f"{args.recipe}: {found.reason}" if found.file is None else f"recipe that passes: {found.file}")
    return 0 if found.file else 1


def _remedy_tables(found: dict) -> str:
    from quantgate.report import (ATTRIBUTION_HEADER, SEARCH_HEADER, VARIANT_HEADER, attribution_rows, search_rows,
                                  variant_rows)

    tables = [(ATTRIBUTION_HEADER, attribution_rows(found["attribution"])), (SEARCH_HEADER, search_rows(found["search"])),
              (VARIANT_HEADER, variant_rows(found["gated"]))]
    return "\n\n".join(_table(header, rows) for header, rows in tables if rows)


def _gate(found, config, metrics: dict, out: Path) -> dict:
    """The remedy's variants through the quantize and validate steps, each in <recipe>/remedy/<number>."""
    from quantgate.results import ReferenceValidation
    from tasks.quantize import quantize
    from tasks.remedy import gate
    from tasks.validate import validate

    reference, device = ReferenceValidation(**metrics["reference"]["validate"]), config.model.device
    return gate(found.variants,
                lambda recipe, n: quantize(metrics["model"]["checkpoint"], recipe, config.model.dtype, device,
                                           str(out / "remedy" / str(n)), config.steps.quantize.roundtrip_min_top1),
                lambda recipe, quantized: validate(quantized.checkpoint, recipe, reference, device, config.steps.validate,
                                                   metrics["reference"]["compute_dtype"], config.model.dtype),
                found.budget)


def approve(args) -> int:
    """Answer a flow run paused for an approval before the Hub (steps.publish.approve), or list those waiting."""
    from flows import approval

    if args.run_id is None:
        waiting = approval.waiting()
        print("\n".join(f"{key}  (flow run {run})" for key, run in waiting.items()) or "no flow run is waiting")
        return 0
    if args.recipe is None:
        print("error: approve takes a run id and a recipe (no arguments: list the flow runs waiting)", file=sys.stderr)
        return 2
    try:
        flow_run = approval.answer(args.run_id, args.recipe, not args.reject, args.reviewer, args.reason)
    except LookupError as e:  # none waiting, answered meanwhile, refused by Prefect
        print(f"error: {args.recipe} of run {args.run_id}: {e}", file=sys.stderr)
        return 2
    print(f"{'rejected' if args.reject else 'approved'}: {args.recipe} of run {args.run_id} (flow run {flow_run})")
    return 0


def publish_adapter(args) -> int:
    from quantgate import adapters
    from quantgate.registry import publish_adapter as publish

    try:
        adapters.read_config(adapters.fetch(str(args.folder.resolve()), Path()))  # a local folder, never the Hub
        target = publish(args.folder, args.name, rooted(args.registry), adapters.FILES)
    except (adapters.AdapterError, OSError, ValueError) as e:  # not an adapter, an unwritable registry
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"published: {target} (use it as source: registry:{args.name} or registry:{args.name}/{target.name})")
    return 0


def alerts(args) -> int:
    from flows import alerts as automations

    webhook = args.webhook or os.environ.get("QUANTGATE_ALERTS_WEBHOOK")
    if not webhook:
        print("error: no webhook: --webhook URL, or QUANTGATE_ALERTS_WEBHOOK (kept out of the process list)",
              file=sys.stderr)
        return 2
    for name in automations.install(webhook, args.nightly_window):
        print(f"automation: {name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quantgate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, help_text in (("plan", plan, "validate a config and print each recipe's plan (no weights loaded)"),
                                ("run", run, "run the quantize-model flow on a config")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", nargs="?" if name == "run" else None, type=Path, default=DEFAULT_CONFIG)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set steps.quantize.timeout_s=600")
        p.set_defaults(fn=fn)
    sub.choices["plan"].add_argument("--json", action="store_true", help="print the plans as JSON")
    p = sub.add_parser("report", help="render a run directory's report.md, summary.png, timeline.png and cards again")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(fn=report)
    p = sub.add_parser("remedy", help="which modules cause a recipe's drift, and the recipe that passes")
    p.add_argument("run_dir", type=Path)
    p.add_argument("recipe")
    p.add_argument("--top", type=int, default=8, help="modules whose KL recovery is measured one at a time")
    p.add_argument("--budget", type=float, default=0.5, help="the most bytes, as a fraction of the reference's")
    p.set_defaults(fn=remedy)
    p = sub.add_parser("history", help="list recorded runs, one line per model and recipe")
    p.add_argument("--db", type=history_location, default=HISTORY_DB, help="a SQLite file or postgresql://USER@HOST/DB")
    p.add_argument("--model")
    p.add_argument("--recipe")
    p.add_argument("--status", choices=["passed", "failed", "error", "skipped", "interrupted"])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(fn=show_history)
    p = sub.add_parser("dashboard", help="write the static HTML dashboard from the history")
    p.add_argument("--db", type=history_location, default=HISTORY_DB, help="a SQLite file or postgresql://USER@HOST/DB")
    p.add_argument("--out", type=Path, default=DASHBOARD)
    p.set_defaults(fn=write_dashboard)
    p = sub.add_parser("approve", help="approve or reject a Hub upload a flow run waits for (no arguments: list them)")
    p.add_argument("run_id", nargs="?")
    p.add_argument("recipe", nargs="?")
    p.add_argument("--reject", action="store_true")
    p.add_argument("--reviewer", default=os.environ.get("USER", ""))
    p.add_argument("--reason", default="")
    p.set_defaults(fn=approve)
    p = sub.add_parser("publish-adapter", help="put a LoRA adapter folder in the registry as the next version of NAME")
    p.add_argument("folder", type=Path)
    p.add_argument("name", type=slug)
    p.add_argument("--registry", type=Path, default=PROJECT_ROOT / "registry",
                   help="steps.publish.registry_dir (a relative path is the project root's, as in a config)")
    p.set_defaults(fn=publish_adapter)
    p = sub.add_parser("alerts", help="create the nightly's automations (configs/automations) on the Prefect server")
    p.add_argument("--webhook", help="where notifications are posted (Slack, Teams, any JSON receiver); default: "
                   "$QUANTGATE_ALERTS_WEBHOOK")
    p.add_argument("--nightly-window", type=int, metavar="SECONDS",
                   help="how long a nightly may run before it is reported as not finished (default: the file's, 8 h)")
    p.set_defaults(fn=alerts)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except HistoryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
