"""The CLI's shared parts: the app, its one error handler and small option parsers."""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from ..errors import SclensError


def fail(exc: Exception) -> None:
    """Print ``error: ...`` in red on stderr and exit with code 2."""
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


class Group(TyperGroup):
    """The one error handler: any sclens error raised by any subcommand becomes ``error: ...`` and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SclensError as exc:
            fail(exc)


app = typer.Typer(
    cls=Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="sclens: open single-cell foundation models and read what their attention heads learned.",
)


def split_list(s: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [x.strip() for x in s.split(",") if x.strip()]
