"""sclens: open single-cell foundation models and turn what their attention heads learned into small,
standalone, benchmarked algorithms."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sclens")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+local"

from .errors import CheckpointError, InputError, SclensError  # noqa: E402

__all__ = ["__version__", "SclensError", "InputError", "CheckpointError"]
