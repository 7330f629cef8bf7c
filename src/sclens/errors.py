"""Exceptions raised by sclens.

Every error a user can cause by passing bad input is a subclass of :class:`SclensError`, and its
message says what was wrong, where, and what was expected, so that no user ever has to read a
traceback from deep inside numpy or torch.
"""

from __future__ import annotations


class SclensError(Exception):
    """Base class of every error sclens raises on purpose."""


class InputError(SclensError, ValueError):
    """The data handed to sclens (AnnData, arrays, labels, gene ids) cannot be used as given."""


class CheckpointError(SclensError, ValueError):
    """A model checkpoint directory or file is missing, corrupt, unsafe or inconsistent."""


class ArtifactError(SclensError, ValueError):
    """An extracted-algorithm file is corrupt, tampered with, or from an unsupported format version."""


# what a numerical step (a fitter, a benchmarked method) may raise on data it cannot handle: reported as that step's
# failure with its reason while the run goes on; programming errors (TypeError, AttributeError, ...) still surface.
# ValueError covers InputError and numpy's LinAlgError.
DATA_ERRORS = (ValueError, ArithmeticError, RuntimeError)


def preview(items, limit: int = 8) -> str:
    """Format the first few items of a collection for an error message: ``'A', 'B', ... (+12 more)``."""
    items = list(items)
    shown = ", ".join(repr(str(x)) for x in items[:limit])
    if len(items) > limit:
        shown += f", ... (+{len(items) - limit} more)"
    return shown
