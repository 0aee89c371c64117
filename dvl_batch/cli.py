"""The `dvl-batch` command line (Typer). Every run command builds a JobSpec and calls `api.run`.

Errors the user can fix print one line and exit with the documented code (README,
"Exit codes"); only bugs print a traceback.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from ._version import __version__
from .cli_bench import bench
from .cli_options import (
    JOB_OPTIONS,
    ImageField,
    InputOption,
    Inputs,
    KeyField,
    MaxPromptTokens,
    Model,
    Output,
    Prompt,
    Question,
    QuestionField,
    QuestionsFile,
    Recipe,
    SystemPrompt,
    Task,
)
from .cli_signals import ignore_stop_signals, stopped_by_signal, terminate_as_interrupt
from .cli_tables import print_summary, status_table
from .errors import EXIT_INTERRUPTED, EXIT_OK, DvlError, UsageError


class _Command(TyperCommand):
    """Usage lines in the usual Unix style: `caption [OPTIONS] INPUT...`, `run [OPTIONS] RECIPE`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if getattr(param, "param_type_name", None) != "argument":
                continue
            name = param.metavar or (param.name or "").upper()
            if param.nargs != 1 and not name.endswith("..."):
                name += "..."
            pieces.append(name if param.required else f"[{name}]")
        return pieces


app = typer.Typer(
    name="dvl-batch",
    help="Caption and question-answer millions of images with DeepSeek-VL: shards in, resumable parquet out.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, soft_wrap=True)  # one-line messages stay one line in logs
out_console = Console()

def _execute(task: str | None, inputs: list[str] | None, recipe: Path | str | None, options: dict[str, Any]) -> None:
    """One job command: the shared spec builder, then the shared run path (api.run)."""
    from .config.spec import spec_from_recipe

    if task:
        options["task"] = task
    spec = spec_from_recipe(recipe or None, inputs=inputs, **options)
    _refuse_if_locked(spec)
    from .api import (  # torch and transformers load only once options are valid
        ErrorRowsError,
        UnreadableShardsError,
        run,
    )
    try:
        result = _run_job(run, spec)
    except UnreadableShardsError as exc:
        print_summary(err, exc.result)
        for line in exc.result.stats.unreadable:
            err.print(f"[red]not read[/]: {escape(line)}")
        err.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(exc.exit_code) from None
    except ErrorRowsError as exc:
        print_summary(err, exc.result)
        err.print(f"[red]strict mode[/]: {escape(str(exc).removeprefix('strict mode: '))}")
        raise typer.Exit(exc.exit_code) from None
    except BaseException as exc:  # a second Ctrl-C/SIGTERM, or one outside the job's own handling
        if not stopped_by_signal(exc):
            raise
        err.print(f"[red]aborted[/]: parts already in {escape(spec.output.path)}/parts are complete; rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    print_summary(err, result)
    for line in result.stats.unreadable:  # an interrupted run may have some too
        err.print(f"[red]not read[/]: {escape(line)}")
    if result.interrupted:
        err.print(f"[red]interrupted[/]: {result.stats.rows} rows saved this run ({result.stats.shards_written} shards "
                  "finished); rerun the same command to resume")
        raise typer.Exit(EXIT_INTERRUPTED)


def _refuse_if_locked(spec) -> None:
    """Another run holds OUT: exit 3 in a moment, before torch and transformers are imported."""
    from .config.launch import with_launch_defaults
    from .sink.output import OutputDir

    launched = with_launch_defaults(spec)
    if launched.output.path:
        OutputDir(launched.output.path, launched.run.rank or 0, launched.run.world_size or 1).refuse_if_locked()


def _version(value: bool) -> None:
    if value:
        out_console.print(f"dvl-batch {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
) -> None:
    """Caption and question-answer millions of images with DeepSeek-VL."""


def job_command(task: str | None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Make a job command from a function that only declares its own parameters and help.

    Typer reads a command's options from its signature: the shared JOB_OPTIONS are appended
    to the function's own (spelled out in three signatures, they drifted apart), and every
    job command runs the same way: `_execute(task, inputs, recipe, all other options)`.
    """

    def decorate(function: Callable[..., None]) -> Callable[..., None]:
        own = list(signature(function, eval_str=True).parameters.values())
        shared = [Parameter(name, Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
                  for name, annotation in JOB_OPTIONS.items()]

        @functools.wraps(function)
        def command(**options: Any) -> None:
            _execute(task, options.pop("inputs"), options.pop("recipe"), options)

        command.__signature__ = Signature(own + shared)  # type: ignore[attr-defined]
        return command

    return decorate


@app.command(cls=_Command)
@job_command("caption")
def caption(
    inputs: Inputs,
    output: Output = None,
    recipe: Recipe = None,
    model: Model = None,
    prompt: Prompt = None,
    system_prompt: SystemPrompt = None,
    max_prompt_tokens: MaxPromptTokens = None,
) -> None:
    """Write a caption for every image. Rerun the same command to resume."""


@app.command(cls=_Command)
@job_command("vqa")
def vqa(
    inputs: Inputs,
    output: Output = None,
    question: Question = None,
    questions_file: QuestionsFile = None,
    question_field: QuestionField = None,
    recipe: Recipe = None,
    model: Model = None,
    system_prompt: SystemPrompt = None,
    max_prompt_tokens: MaxPromptTokens = None,
) -> None:
    """Answer questions about every image: one row per (image, question)."""


@app.command("run", cls=_Command)
@job_command(None)  # the task comes from the recipe or --task
def run_recipe(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="A bundled recipe name (see `dvl-batch recipes`) or a YAML file.", show_default=False)],
    inputs: InputOption = None,
    output: Output = None,
    task: Task = None,
    prompt: Prompt = None,
    question: Question = None,
    questions_file: QuestionsFile = None,
    question_field: QuestionField = None,
    system_prompt: SystemPrompt = None,
    max_prompt_tokens: MaxPromptTokens = None,
    model: Model = None,
) -> None:
    """Run a recipe: `dvl-batch run short-caption -i SHARDS -o OUT`. Options override the recipe."""


@app.command("recipes", cls=_Command)
def list_recipes(
    name: Annotated[str | None, typer.Argument(help="Print this recipe's YAML instead of the list.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the bundled recipes (or print one) for `dvl-batch run RECIPE`."""
    from .config.recipes import bundled_recipes, find_recipe

    if name:
        path = find_recipe(name)
        try:
            typer.echo(path.read_text(encoding="utf-8"), nl=False)
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot print the recipe {path} ({getattr(exc, 'strerror', None) or exc})") from None
        return
    found = bundled_recipes()
    if as_json:
        out_console.print_json(json.dumps([{"name": r.name, "task": r.task, "description": r.description, "path": str(r.path)} for r in found]))
        return
    table = Table(title="Bundled recipes: dvl-batch run NAME -i INPUT -o OUT", title_justify="left")
    for column in ("name", "task", "description"):
        table.add_column(column)
    for info in found:
        table.add_row(info.name, info.task, info.description)
    out_console.print(table)


@app.command(cls=_Command)
def status(
    output: Annotated[Path, typer.Argument(help="An output folder of a run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Shards done/total, rows, error rows and throughput of an output folder."""
    from .inspect import collect_status

    report = collect_status(output)
    if as_json:
        out_console.print_json(json.dumps(report))
        return
    out_console.print(status_table(output, report))


@app.command(cls=_Command)
def inspect(
    inputs: Inputs,
    image_field: ImageField = None,
    key_field: KeyField = None,
    shard_size: Annotated[int, typer.Option(help="Images per shard for plain folders.", min=1)] = 1000,
    max_shards: Annotated[int | None, typer.Option(help="Read only the first N shards. \\[default: all]", min=1)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List shards, sample counts and fields of the inputs, without loading a model."""
    from .inspect import inspect_inputs

    shards, reports = inspect_inputs(inputs, image_field, key_field, shard_size, max_shards)
    rows = [
        {
            "shard": r.shard.id,
            "format": r.shard.format,
            "url": r.shard.url,
            "samples": r.samples,
            "error_samples": r.errors,
            "partial": r.partial,
            "duplicate_keys": r.duplicate_keys,
            "message": r.message,
            "fields": dict(r.fields),
            "image_fields": dict(r.image_fields),
        }
        for r in reports
    ]
    summary = {"shards": len(shards), "inspected": len(reports), "samples": sum(r.samples for r in reports),
               "duplicate_keys": sum(r.duplicate_keys for r in reports), "details": rows}
    if as_json:
        out_console.print_json(json.dumps(summary))
        return
    table = Table(title=f"{len(shards)} shards, {summary['samples']} samples in the {len(reports)} read", title_justify="left")
    for column in ("shard", "format", "samples", "errors", "image field(s)", "fields found", "note"):
        table.add_column(column)
    for r in reports:
        note = ("partial: " if r.partial else "") + (r.message or "")
        table.add_row(
            r.shard.id, r.shard.format, str(r.samples), str(r.errors), ", ".join(sorted(r.image_fields)) or "-",
            ", ".join(sorted(r.fields)), note,
        )
    out_console.print(table)
    for r in reports:
        if r.samples and not r.image_fields:
            asked = f"--image-field {image_field} matches no field" if image_field else "no image field found"
            err.print(f"[yellow]{asked} in {escape(r.shard.id)}[/] (fields: {escape(', '.join(sorted(r.fields)) or 'none')}); "
                      "pass --image-field NAME to name the field that holds the images")


app.command("bench", cls=_Command)(bench)


def _run_job(run, spec):
    """api.run, with SIGTERM ignored as soon as it returns (or raises)."""
    try:
        return run(spec, say=lambda text: err.print(f"[yellow]{escape(text)}[/]"))
    finally:
        ignore_stop_signals()


def run_cli() -> None:
    """Console-script entry: map our errors to one line and an exit code."""
    # SIGTERM outside a job's own handling (start-up, model loading) ends the run like
    # Ctrl-C: a message and exit 130 instead of a silent death. api.run installs the
    # graceful "finish in-flight shards" handler for the job itself.
    signal.signal(signal.SIGTERM, terminate_as_interrupt)
    try:
        app()
    except DvlError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")  # paths and messages may hold [brackets]
        sys.exit(exc.exit_code)
    except BaseException as exc:
        if not stopped_by_signal(exc):
            raise
        err.print("[red]aborted[/]: parts already written are complete; rerun to resume")
        sys.exit(EXIT_INTERRUPTED)
    finally:
        ignore_stop_signals()  # every command: the interpreter's teardown is not worth a -15
    sys.exit(EXIT_OK)
