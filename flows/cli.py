"""The `stepforge` command line."""

from __future__ import annotations

import logging
import os
import time
import traceback
from pathlib import Path
from typing import Callable, Iterable, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from flows.datasets_cli import datasets_app
from flows.errors import describe, one_line, print_error
from storage.errors import StepforgeError

app = typer.Typer(help="Build versioned, verified step-level preference datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
# Markup off: messages and tables hold user text (paths, config values, server answers) that must print as
# is; a `[/b]` in a path would otherwise raise MarkupError and hide the real message.
console = Console(markup=False)
err = Console(stderr=True, markup=False)


@app.command()
def build(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of a BuildConfig."),
    set_: list[str] = typer.Option([], "--set", help="Override one field, e.g. --set search.k=8 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs and the traceback of a failure."),
) -> None:
    """Run the `build_dataset` flow (default: the embedded synthetic arithmetic domain) and commit a version.

    Every failure ends with one line, `error: <what failed and what to do>`; `--verbose` adds the traceback."""
    from flows.components import verify
    from flows.config import load_config

    try:
        cfg = load_config(config, set_)
        # Before the Prefect server starts: a missing file or key or a bad store root is a config mistake,
        # not a failed run.
        verify(cfg)
        _check_root_names(cfg)  # likewise a dataset name that collides with another on the root
    except StepforgeError as exc:
        _fail(exc, 2, verbose)
    _prefect_env(verbose)

    from flows.build import build_dataset

    summary = _run_flow(cfg, lambda: build_dataset(cfg), f"building {cfg.dataset}", None, verbose)
    from flows.summary import summary_rows
    from storage.catalog import view_name

    _print_rows(f"stepforge build: {cfg.dataset}", summary_rows(summary))
    if summary.get("label_by_step"):
        by_step = Table(title="labels by step position", caption="shares over steps with k > 0", show_header=True)
        cols = ("step", "steps", "k = 0", "positive", "mean MC")
        for col in cols:
            by_step.add_column(col, justify="right")
        for row in summary["label_by_step"]:
            by_step.add_row(*(str(row[c]) for c in cols))
        console.print(by_step)
    # On its own line and never wrapped, so it can be copied even from a narrow terminal. Text, not markup:
    # the location is a user's path.
    console.print(Text(f"Committed {summary['dataset']}@v{summary['version']} at {summary['location']}"),
                  soft_wrap=True, highlight=False)
    console.print(Text(f"Query it: stepforge datasets sql \"SELECT * FROM {view_name(cfg.dataset, 'steps')} LIMIT 5\""),
                  soft_wrap=True, highlight=False)


@app.command()
def mustard(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of a MustardConfig."),
    set_: list[str] = typer.Option([], "--set", help="Override one field, e.g. --set max_revisions=0 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs and the traceback of a failure."),
) -> None:
    """Run the `mustard_dataset` flow: concept seeds -> problem, informal proof and Lean 4 proof by the author
    model -> Lean checks -> revisions with Lean's messages -> commit the records Lean accepted as a version.

    The default needs no model and no Lean: a simulated author and the stand-in Lean REPL (not Lean)."""
    from flows.mustard_config import load_mustard_config, verify_mustard
    from storage.catalog import view_name

    try:
        cfg = load_mustard_config(config, set_)
        n_seeds = verify_mustard(cfg)
        _check_root_names(cfg)
    except StepforgeError as exc:
        _fail(exc, 2, verbose)
    _prefect_env(verbose)

    from flows.mustard import mustard_dataset, summary_rows

    summary = _run_flow(cfg, lambda: mustard_dataset(cfg), f"generating {cfg.dataset} (seeds)", n_seeds, verbose)
    _print_rows(f"stepforge mustard: {cfg.dataset}", summary_rows(summary))
    console.print(Text(f"Committed {summary['dataset']}@v{summary['version']} at {summary['location']}"),
                  soft_wrap=True, highlight=False)
    console.print(Text(f"Query it: stepforge datasets sql \"SELECT concept, revisions, problem FROM "
                       f"{view_name(cfg.dataset, 'mustard')} LIMIT 5\""),
                  soft_wrap=True, highlight=False)


def _print_rows(title: str, rows: Iterable[tuple[object, object]]) -> None:
    """A run's summary rows as a two-column table."""
    table = Table(title=title, show_header=False)
    for key, value in rows:
        table.add_row(str(key), str(value))
    console.print(table)


def _prefect_env(verbose: bool) -> None:
    """Prefect settings of a run started here (`build`, `mustard`), set before Prefect is imported."""
    if not verbose:
        # Quiet on the terminal (the summary table says it all), but the run's log lines (one per shard, the
        # summary) still reach the API, so a run started here reads the same in the UI as a deployment run.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Prefect waits 20 s for its local server, which a busy machine can miss; a run can afford to wait.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def _run_flow(cfg, run: Callable[[], dict], label: str, total: int | None, verbose: bool) -> dict:  # noqa: ANN001
    """Run a flow (`run()`) under a progress bar fed by `flows.progress` and return its summary; on failure
    print one `error:` line (after the bar's last frame) and exit. Shared by `build` and `mustard`, so both
    say the same after an interrupt, a failure, or an API lost after the commit (`_fail_after_commit`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows import progress

    quiet = None if verbose else _quiet_failures()
    started = time.time()
    failure: BaseException | None = None
    summary: dict = {}
    # The bar is closed (its last frame drawn) before any error is printed: the error is the last line.
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=False) as bar:
            task_id = bar.add_task(escape(label), total=total)

            def on_progress(event: str, n: int) -> None:
                if event == "total":
                    bar.update(task_id, total=n)
                else:
                    bar.advance(task_id, n)

            unsubscribe = progress.subscribe(on_progress)
            try:
                summary = run()
            finally:
                unsubscribe()
    except (Exception, KeyboardInterrupt) as exc:  # reported below as one line; a bug keeps its traceback
        failure = exc
    finally:
        _drain_prefect_services()  # their "still processing" notes would land after our last line
        if quiet is not None:
            quiet()
    if isinstance(failure, KeyboardInterrupt):
        print_error(err, "interrupted; rerun the same command to resume from the finished shards.")
        raise typer.Exit(130)
    if failure is not None:
        if _api_lost(failure):
            if not verbose:  # Prefect's services retry their queues at exit, loudly, against the lost server
                _silence_prefect_services()
            _fail_after_commit(cfg, failure, started)
        _fail(failure, 1, verbose)
    return summary


def _is_dir(path: Path) -> bool:
    """`path.is_dir()`, False where the path cannot even be looked at: `Path.is_dir` raises for errors other
    than "not there" (a name longer than the file system allows, ENAMETOOLONG; a folder it may not search,
    EACCES), and such a root is the flow's to report, in its one `error:` line about writing to it."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _check_root_names(cfg) -> None:  # noqa: ANN001 (BuildConfig, imported lazily)
    """Refuse a dataset name that collides with one already on the root (the flow checks it too, for
    deployments). Skipped where the check would need the Prefect API (a credentials block) or would
    create the root (a local folder not there yet holds no other names); a store that does not answer is
    left for the flow to report."""
    from flows.stores import open_root
    from storage.names import check_dataset_name

    st = cfg.storage
    if st.is_remote and st.credentials_block:
        return
    if not st.is_remote and not _is_dir(Path(st.root).expanduser()):
        return
    try:
        store = open_root(st)
        check_dataset_name(store, cfg.dataset, catalog=st.catalog)
    except StepforgeError:
        raise
    except Exception:  # noqa: BLE001 - unreachable store: the flow's own error says what to do
        return



def _fail(exc: BaseException, code: int, verbose: bool) -> NoReturn:
    """Print `exc` as the last line (after its traceback with --verbose) and exit with `code`."""
    message = describe(exc)
    if verbose or message is None:
        err.print(Text("".join(traceback.format_exception(exc)).rstrip()), highlight=False, soft_wrap=True)
    if message is None:
        message = (f"unexpected {type(exc).__name__}: {one_line(exc)}; this is a bug in stepforge: please report it "
                   f"with the traceback above; rerunning the build resumes from the finished shards.")
        code = 1
    print_error(err, message)
    raise typer.Exit(code)


def _api_lost(exc: BaseException) -> bool:
    from flows.errors import _prefect

    return not isinstance(exc, StepforgeError) and _prefect(exc) is not None


def _silence_prefect_services() -> None:
    everything = _DropAll()
    for name in ("EventsWorker", "APILogWorker", "prefect.events.clients", "prefect._internal.concurrency"):
        logging.getLogger(name).addFilter(everything)


def _fail_after_commit(cfg, exc: BaseException, started: float) -> None:  # noqa: ANN001 (BuildConfig, lazily)
    """The Prefect API stopped answering. Shards and the commit need no API (task states travel as events,
    which are dropped), so the build often committed before the flow failed to report its end: say so
    rather than ask for a rerun, which would only add an identical version. Returns when nothing of this
    build was committed during this command."""
    from datetime import datetime

    from flows.components import open_config_store
    from storage.release import list_versions, read_manifest

    try:
        store = open_config_store(cfg)
        versions = list_versions(store, cfg.dataset)
        manifest = read_manifest(store, cfg.dataset, versions[-1]) if versions else None
    except Exception:  # the ordinary message below is still right
        return
    if manifest is None or manifest.get("build_key") != cfg.build_key():
        return
    committed = datetime.fromisoformat(manifest["created_at"]).timestamp()
    if committed < int(started):  # created_at has whole seconds
        return
    version = manifest["version"]
    print_error(err, f"the Prefect API stopped answering ({type(exc).__name__}: {one_line(exc)}) after "
                     f"{cfg.dataset} v{version} was committed (content hash {manifest['content_hash'][:16]}, "
                     f"{store.uri(f'{cfg.dataset}/v{version}')}): the release is complete; only the run's "
                     f"final state and artifacts are missing in Prefect, so do not rerun (it would add an identical "
                     f"version).")
    raise typer.Exit(1)


class _DropFailures(logging.Filter):
    """Prefect logs a failed task or flow run at ERROR, with its traceback, once per task retry and again for
    the flow; without --verbose the CLI's one `error:` line reports the failure instead. Warnings stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _drain_prefect_services() -> None:
    """Send Prefect's queued events and logs now rather than at interpreter exit (where they are announced
    with "Still processing items" warnings after everything the CLI printed)."""
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (EventsWorker, APILogWorker):
            service.drain_all(timeout=10)
    except Exception:  # best effort: the data is committed or the failure reported either way
        pass


def _quiet_failures() -> Callable[[], None]:
    """Install the filter on Prefect's run loggers; returns the function that removes it."""
    failures, everything = _DropFailures(), _DropAll()
    # prefect._internal.concurrency: a queue service failing an item (an event the API never took, printed
    # whole, once per item) while the API is away; the CLI's `error:` line or the events client's warning
    # says what matters.
    installed = [(logging.getLogger(name), failures) for name in ("prefect.flow_runs", "prefect.task_runs",
                                                                  "prefect.flow_engine", "prefect.task_engine",
                                                                  "prefect._internal.concurrency")]
    # Prefect's queue services (loggers named after their class) note work still queued while draining.
    installed += [(logging.getLogger(name), everything) for name in ("EventsWorker", "APILogWorker")]
    for lg, flt in installed:
        lg.addFilter(flt)

    def remove() -> None:
        for lg, flt in installed:
            lg.removeFilter(flt)

    return remove


@app.command("serve-policy")
def serve_policy(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port)."),
    model: str = typer.Option("simulated-arith", help="Model name the server answers to."),
    step_error_rate: float = typer.Option(0.1, help="The simulated policy's base step error rate."),
    recovery_rate: float = typer.Option(0.0, "--recovery-rate",
                                        help="The simulated policy's recovery_rate (silent returns to the right "
                                        "value after a mistake; give the build's policy the same to compare)."),
    lucky_rate: float = typer.Option(0.0, "--lucky-rate",
                                     help="The simulated policy's lucky_rate (wrong chains ending on the gold answer)."),
    separator: str = typer.Option("\\n", "--separator",
                                  help="Step separator the simulated policy writes and reads; \\n and \\t are "
                                  "understood (e.g. '\\n\\n'). Give the build the same prompt.step_format.separator."),
    code_steps: bool = typer.Option(False, "--code-steps",
                                    help="Write rStar-style code steps (each equation also as <code>print(...)</code>) "
                                    "for the code step check (a build's checks=[{kind: code-check}])."),
    latency: float = typer.Option(0.0, "--latency", help="Seconds each request takes (mean)."),
    latency_jitter: float = typer.Option(0.0, "--latency-jitter", help="Latency varies in L*(1 +- jitter)."),
    fault_rate: float = typer.Option(0.0, "--fault-rate", help="Share of requests that get a fault (0..1)."),
    faults: str = typer.Option("5xx,429,slow,drop", "--faults", help="Fault kinds to cycle through."),
    slow: float = typer.Option(5.0, "--slow", help="Seconds a `slow` fault holds its response."),
    retry_after: float = typer.Option(0.05, "--retry-after", help="Retry-After of injected 429s (seconds)."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env",
                                              help="Require the key held in this environment variable."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer",
                                            help="Tokenizer folder for token-ID prompts (a build's policy.tokenizer)."),
    die_after: Optional[int] = typer.Option(None, "--die-after",
                                            help="Crash (stop listening, drop connections) after this many "
                                            "requests: for testing a build's failure and resume."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model",
                                              help="Also serve the simulated judge under this model name (a "
                                              "build's judge.policy: kind=openai, model=NAME)."),
    judge_accuracy: float = typer.Option(0.8, "--judge-accuracy", help="The simulated judge's accuracy."),
    author_model: Optional[str] = typer.Option(None, "--author-model",
                                               help="Also serve the MUSTARD flow's simulated author under this model "
                                               "name (`stepforge mustard --set author.kind=openai --set "
                                               "author.model=NAME`)."),
    author_mistake_rate: float = typer.Option(0.2, "--author-mistake-rate", help="The simulated author's mistake_rate."),
    author_fix_rate: float = typer.Option(0.8, "--author-fix-rate", help="The simulated author's fix_rate."),
    prover_model: Optional[str] = typer.Option(None, "--prover-model",
                                               help="Also serve the formal domain's simulated Lean prover under this "
                                               "model name (`--set source.kind=synthetic-lean --set policy.kind=openai "
                                               "--set policy.model=NAME`), with --step-error-rate."),
) -> None:
    """Serve the simulated policy over the OpenAI HTTP API (a stand-in for vLLM), with optional faults."""
    from pydantic import ValidationError

    from tasks.testing.standin_server import StandinServer, StandinServerConfig

    # Shells pass "\n" as two characters; only these two escapes are decoded, so other text stays as typed.
    sep = separator.replace("\\n", "\n").replace("\\t", "\t")
    try:
        cfg = StandinServerConfig(model=model, step_error_rate=step_error_rate, recovery_rate=recovery_rate,
                                  lucky_rate=lucky_rate, separator=sep, code_steps=code_steps, latency_s=latency,
                                  latency_jitter=latency_jitter,
                                  fault_rate=fault_rate, fault_kinds=[f.strip() for f in faults.split(",") if f.strip()],
                                  slow_s=slow, retry_after_s=retry_after, die_after=die_after,
                                  api_key=os.environ.get(api_key_env) if api_key_env else None, tokenizer=tokenizer,
                                  judge_model=judge_model, judge_accuracy=judge_accuracy, author_model=author_model,
                                  author_mistake_rate=author_mistake_rate, author_fix_rate=author_fix_rate,
                                  prover_model=prover_model)
    except ValidationError as exc:
        print_error(err, "; ".join(f"--{'.'.join(map(str, e['loc'])) or 'option'}: {e['msg']}" for e in exc.errors()))
        raise typer.Exit(2) from None
    server = StandinServer(cfg, host=host, port=port)
    import asyncio

    # The build must split steps where the server writes them; shown only when it is not the default.
    # YAML double quotes decode \n like the option does: the hint can be pasted as printed.
    sep_hint = "" if sep == "\n" else f" --set 'prompt.step_format.separator=\"{separator}\"'"

    def ready(url: str) -> None:
        # Printed once listening, so scripts can wait for this line (and read the port when --port 0).
        console.print(Text(f"stand-in policy server on {url} (model {cfg.model!r}); use it with: stepforge build "
                           f"--set policy.kind=openai --set policy.base_url={url} --set policy.model={cfg.model}"
                           f"{sep_hint}"), soft_wrap=True, highlight=False)

    try:
        asyncio.run(server.serve_async(on_ready=ready))
    except KeyboardInterrupt:
        pass


@app.command("serve-lean")
def serve_lean(
    protocol: str = typer.Option(..., "--protocol", help="`repl`: the Lean REPL on stdin/stdout; `kimina`: the "
                                 "Kimina Lean Server's HTTP API."),
    version: str = typer.Option("4.19", "--version", help="Lean version whose quirks to imitate (4.18: no "
                                "proofStatus; 4.28: sorry warning quoted with backticks)."),
    cost_ms: float = typer.Option(0.0, "--cost-ms", help="Milliseconds each proof takes."),
    header_cost_ms: float = typer.Option(0.0, "--header-cost-ms", help="Milliseconds a header (imports) takes."),
    hang_rate: float = typer.Option(0.0, "--hang-rate", help="repl: share of proofs that never answer."),
    crash_rate: float = typer.Option(0.0, "--crash-rate", help="repl: share of proofs that kill the process."),
    grow_mb: int = typer.Option(0, "--grow-mb", help="repl: MiB of memory kept after every command."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the random faults."),
    host: str = typer.Option("127.0.0.1", help="kimina: address to listen on."),
    port: int = typer.Option(8000, help="kimina: port to listen on."),
    max_repls: int = typer.Option(4, "--max-repls", help="kimina: REPL slots before answering 429."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="kimina: require the key held in "
                                              "this environment variable."),
    fault_429_rate: float = typer.Option(0.0, "--fault-429-rate", help="kimina: share of requests answered 429."),
    no_header_shift: bool = typer.Option(False, "--no-header-shift", help="kimina: count message lines from "
                                         "the body, like servers before the header-offset fix."),
) -> None:
    """Serve the Lean stand-in (NOT Lean: a checker of a stated fragment, see the README) over the REPL or
    Kimina protocol, with optional faults, for testing Lean clients where no Lean toolchain exists."""
    if protocol == "repl":
        # stdout carries the protocol: nothing else may be printed there.
        from verifiers.lean.testing.repl_server import ReplFaults, serve

        raise typer.Exit(serve(ReplFaults(version=version, cost_ms=cost_ms, header_cost_ms=header_cost_ms,
                                          hang_rate=hang_rate, crash_rate=crash_rate, grow_mb=grow_mb, seed=seed)))
    if protocol != "kimina":
        print_error(err, f"`--protocol` must be `repl` or `kimina`, got {protocol!r}")
        raise typer.Exit(2)
    from verifiers.lean.testing.kimina_server import KiminaStandin, KiminaStandinConfig

    cfg = KiminaStandinConfig(max_repls=max_repls, version=version, cost_ms=cost_ms, header_cost_ms=header_cost_ms,
                              fault_429_rate=fault_429_rate, seed=seed or 0, shift_header_lines=not no_header_shift,
                              api_key=os.environ.get(api_key_env) if api_key_env else None)
    console.print(f"Kimina stand-in (not Lean) on http://{host}:{port}; use it with: --set verifier.lean.kind=kimina "
                  f"--set verifier.lean.base_url=http://{host}:{port}", soft_wrap=True, highlight=False)
    KiminaStandin(cfg, host=host, port=port).serve_forever()


@app.command("serve")
def serve(
    deployment: list[str] = typer.Option([], "--deployment", "-d",
                                         help="Serve only this deployment of prefect.yaml (repeatable); default: all."),
    prefect_file: Optional[Path] = typer.Option(None, "--prefect-file",
                                                help="Deployments file; default ./prefect.yaml, else the repository's."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Flow runs executing at once (default: no limit)."),
) -> None:
    """Serve prefect.yaml's deployments (builds, the nightly schedule, publish on commit) from this process:
    runs started from the Prefect UI or API execute here. No work pool or worker needed; PREFECT_API_URL
    names the server."""
    from flows.serve import load_deployments, take_over

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        deployments = load_deployments(prefect_file, deployment or None)
    except StepforgeError as exc:
        print_error(err, str(exc))
        raise typer.Exit(2) from None
    # Said before serving: a worker route set up on the same server loses these deployments to this process.
    for name, pool in take_over(deployments).items():
        err.print(Text(f"{name}: registered on work pool {pool!r}; served here now, without a pool, so its runs "
                       f"run in this process, not on that pool's workers (`prefect deploy` gives it back)."),
                  soft_wrap=True, highlight=False)
    from prefect import serve as prefect_serve

    prefect_serve(*deployments, limit=limit)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
