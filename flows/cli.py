"""The `stepforge` command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.datasets_cli import datasets_app
from storage.errors import StepforgeError

app = typer.Typer(help="Build versioned, verified step-level preference datasets.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
console = Console()
err = Console(stderr=True)


@app.command()
def build(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file of a BuildConfig."),
    set_: list[str] = typer.Option([], "--set", help="Override one field, e.g. --set search.k=8 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
) -> None:
    """Run the `build_dataset` flow (default: the embedded synthetic arithmetic domain) and commit a version."""
    from flows.config import load_config

    try:
        cfg = load_config(config, set_)
    except StepforgeError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from flows import progress
    from flows.build import build_dataset

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=False) as bar:
        task_id = bar.add_task(f"building {cfg.dataset}", total=None)

        def on_progress(event: str, n: int) -> None:
            if event == "total":
                bar.update(task_id, total=n)
            else:
                bar.advance(task_id, n)

        unsubscribe = progress.subscribe(on_progress)
        try:
            summary = build_dataset(cfg)
        except StepforgeError as exc:
            err.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from None
        finally:
            unsubscribe()
    from flows.summary import summary_rows

    table = Table(title=f"stepforge build: {cfg.dataset}", show_header=False)
    for key, value in summary_rows(summary):
        table.add_row(key, value)
    console.print(table)
    # On its own line and never wrapped, so it can be copied even from a narrow terminal.
    console.print(f"Committed {summary['dataset']}@v{summary['version']} at {summary['location']}", soft_wrap=True,
                  highlight=False)
    console.print(f"Query it: stepforge datasets sql \"SELECT * FROM {cfg.dataset.replace('-', '_')}_steps LIMIT 5\"")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
