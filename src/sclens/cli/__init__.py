"""The ``sclens`` command line: one subcommand per stage of the data flow (:mod:`.stages`), the circuits group
(:mod:`.circuits`) and one error handler for all of them (:mod:`.common`)."""

from . import circuits, stages  # importing them registers the subcommands
from .common import app

__all__ = ["app", "circuits", "main", "stages"]


def main() -> None:
    """The ``sclens`` console script."""
    app()

