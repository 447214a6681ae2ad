"""The `mms` command: the client's commands, plus the commands of whatever installed package
registers some in the ``mms.commands`` entry-point group (the server registers `serve`,
`worker`, `admin` ...). The client alone gives the client's commands only.

An entry point names a function ``register(cli: typer.Typer) -> None`` that adds commands or
groups to the root command; ``subgroup`` finds a group another part already made (both sides
add to ``base-image``).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Annotated, Any

import typer
from rich.markup import escape

from mms_client.diagnostics import Verbosity
from mms_client.output import GLOBAL_PANEL, err

COMMANDS_GROUP = "mms.commands"


def require_installed(*modules: str) -> None:
    """Raise ModuleNotFoundError unless each of ``modules`` is installed, without importing it.

    For a module of commands: called at its top, it makes the module fail to load where its
    extra is not installed (``mms`` then leaves its commands out) while costing ``mms``'s start
    nothing where it is.
    """
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)


# The modules of this project whose absence is a broken install, not a missing extra.
_OWN_PACKAGES = {"mms_client", "app", "workers", "scoring_server", "migrations"}

Register = Callable[[typer.Typer], None]

BASE_IMAGE_HELP = "The prebuilt inference base images."


def subgroup(cli: typer.Typer, name: str, help: str) -> typer.Typer:
    """The root's command group ``name``, made (with ``help``) if no one made it yet."""
    for info in cli.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(help=help, no_args_is_help=True)
    cli.add_typer(group, name=name)
    return group


def _client_commands(cli: typer.Typer) -> None:
    """The client side: what a user runs against a service, as `az ml` does."""
    from mms_client.accounts import account_cli
    from mms_client.computes import compute_cli
    from mms_client.images import image_cli, list_base_images
    from mms_client.manifests import manifest_cli
    from mms_client.models import model_cli
    from mms_client.services import service_cli
    from mms_client.session import env_cli, login, logout

    cli.command("login")(login)
    cli.command("logout")(logout)
    cli.add_typer(env_cli, name="env")
    cli.add_typer(account_cli, name="account")
    cli.add_typer(model_cli, name="model")
    cli.add_typer(manifest_cli, name="manifest")
    cli.add_typer(image_cli, name="image")
    cli.add_typer(compute_cli, name="compute")
    cli.add_typer(service_cli, name="service")
    subgroup(cli, "base-image", BASE_IMAGE_HELP).command("list")(list_base_images)


def installed_commands() -> list[Register]:
    """The ``mms.commands`` entry points whose package's dependencies are installed.

    One distribution ships the client and the server; its `server` extra brings the server's
    dependencies. Without them the server's entry points fail to import a third-party module:
    those are left out. A module of this project that fails to import is a bug, and raises.
    """
    found: list[Register] = []
    for point in entry_points(group=COMMANDS_GROUP):
        try:
            found.append(point.load())
        except ModuleNotFoundError as exc:
            if (exc.name or "").partition(".")[0] in _OWN_PACKAGES:
                raise
    return found


def build(*registers: Register) -> typer.Typer:
    """The root command: the client's commands, ``registers``, then the installed ones."""
    cli = typer.Typer(help="Model Management Service", no_args_is_help=True, pretty_exceptions_enable=False)
    _client_commands(cli)
    done: list[Register] = []
    for register in [*registers, *installed_commands()]:
        if register not in done:
            register(cli)
            done.append(register)
    _give_global_options(cli)
    return cli


VerboseOption = Annotated[
    bool, typer.Option("--verbose", help="a line on stderr per call to the service", rich_help_panel=GLOBAL_PANEL)
]
DebugOption = Annotated[
    bool,
    typer.Option(
        "--debug",
        help="every HTTP request and response on stderr (secrets shown as ***), and a failure's traceback",
        rich_help_panel=GLOBAL_PANEL,
    ),
]


def with_global_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` as a command that also takes ``--verbose`` and ``--debug`` (listed in its help)."""
    signature = inspect.signature(function, eval_str=True)
    if {"verbose", "debug"} & set(signature.parameters):
        return function

    @functools.wraps(function)
    def command(*args: Any, verbose: bool = False, debug: bool = False, **kwargs: Any) -> Any:
        Verbosity.verbose = Verbosity.verbose or verbose
        Verbosity.debug = Verbosity.debug or debug
        return function(*args, **kwargs)

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [
        *signature.parameters.values(),
        inspect.Parameter("verbose", keyword, default=False, annotation=VerboseOption),
        inspect.Parameter("debug", keyword, default=False, annotation=DebugOption),
    ]
    command.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters if p.annotation is not inspect.Parameter.empty}
    return command


def _give_global_options(cli: typer.Typer) -> None:
    for info in cli.registered_commands:
        if info.callback is not None:
            info.callback = with_global_options(info.callback)
    for group in cli.registered_groups:
        if group.typer_instance is not None:
            _give_global_options(group.typer_instance)


def main(*registers: Register) -> None:
    """Run the command; a failure is one line and a non-zero exit, a traceback only with --debug.

    Usage errors, --help and exit codes are click's own (standalone mode); what escapes it is ours.
    ``registers`` add commands whatever the installed entry points say (``python -m app.cli``).
    """
    from mms_client.api import ServiceError
    from mms_client.profile import ProfileError

    # Taken anywhere on the line, as az takes them (before the command's name too).
    for flag in ("--debug", "--verbose"):
        while flag in sys.argv[1:]:
            sys.argv.remove(flag)
            setattr(Verbosity, flag[2:], True)
    try:
        build(*registers)()
    except (ServiceError, ProfileError) as exc:
        if Verbosity.debug:
            raise
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as exc:
        if Verbosity.debug:
            raise
        err.print(
            f"[red]error:[/red] unexpected {type(exc).__name__}: {escape(str(exc))} "
            "(run again with --debug for the details)",
            highlight=False,
        )
        sys.exit(1)
