"""``python -m sclens.cli``."""

from . import main

main()
