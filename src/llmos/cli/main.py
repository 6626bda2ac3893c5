"""`llmos`: the command table. Each command is a thin wrapper over a library function."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from llmos import __version__
from llmos.cli.admin import audit, tenants_app, usage
from llmos.cli.client_cmds import chat, embed
from llmos.cli.common import console, fail, open_platform, pull_with_progress, settings_from
from llmos.cli.eval_studies import bias_probe, cross_validate
from llmos.cli.evals import eval_app
from llmos.cli.keys import keys_app
from llmos.cli.models import export, models_app, pull
from llmos.cli.pretrain import pretrain
from llmos.cli.search import search_app
from llmos.cli.top import top
from llmos.cli.tuning import files_app, finetune_app, jobs_app
from llmos.errors import LLMOSError, ModelNotFoundError
from llmos.security.private import restrict_umask

app = typer.Typer(
    name="llmos",
    help="LLM OS: a self-hosted operating system for language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _private_files() -> None:
    """LLM OS: a self-hosted operating system for language models."""
    restrict_umask()  # whatever a command writes under LLMOS_HOME (and its workers) is the owner's alone


app.command()(pull)
app.command()(export)
app.command()(chat)
app.command()(embed)
app.command()(top)
app.command()(pretrain)
app.add_typer(models_app, name="models")
app.add_typer(keys_app, name="keys")
app.add_typer(tenants_app, name="tenants")
app.add_typer(files_app, name="files")
app.add_typer(finetune_app, name="finetune")
app.add_typer(jobs_app, name="jobs")
app.add_typer(search_app, name="search")
eval_app.command("bias-probe")(bias_probe)
eval_app.command("cross-validate")(cross_validate)
app.add_typer(eval_app, name="eval")
app.command()(usage)
app.command()(audit)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (LLMOS_HOST, default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (LLMOS_PORT, default 8000).")] = None,
    home: Annotated[str | None, typer.Option("--home", help="Data directory (LLMOS_HOME).")] = None,
    pull_defaults: Annotated[bool, typer.Option("--pull/--no-pull", help="Pull missing default models first.")] = True,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Ray cluster mode: `auto` (a local head on loopback) or the head's HOST:PORT (LLMOS_RAY_ADDRESS).",
        ),
    ] = None,
) -> None:
    """Start the API server (pulling the default models first unless --no-pull)."""
    import uvicorn

    from llmos.api import create_app
    from llmos.api.server import server_config
    from llmos.engine.process import configure_process

    settings = settings_from(host=host, port=port, home=home, ray_address=ray)
    if pull_defaults:
        platform = open_platform(home=home)
        for name in settings.default_models:
            try:
                platform.registry.get(name)
            except ModelNotFoundError:
                console.print(f"pulling default model [bold]{name}[/bold]")
                try:
                    pull_with_progress(platform, name)
                except LLMOSError as exc:
                    raise fail(exc) from exc
        platform.close()
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal to the handler that
    # was installed before it; exiting 0 there tells supervisors the shutdown was clean.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    docs = "docs at /docs" if settings.docs_enabled else "schema at /openapi.json"
    console.print(f"LLM OS {__version__} on http://{settings.host}:{settings.port} ({docs})")
    configure_process(settings)
    uvicorn.Server(server_config(create_app(settings), settings)).run()


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


@app.command()
def config() -> None:
    """Print the effective settings (secrets masked)."""
    console.print_json(data=settings_from().as_public_dict())


@app.command()
def version() -> None:
    """Print the version."""
    console.print(__version__)
