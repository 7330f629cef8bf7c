"""The front door: sclens.<name> for the calls a user makes from Python."""

import pytest


def test_front_door_names_resolve_lazily_and_keep_the_modules():
    import importlib
    import subprocess
    import sys

    import sclens

    for name in sclens._FRONT_DOOR:
        assert callable(getattr(sclens, name)), name
    assert importlib.import_module("sclens.screen").screen is sclens.run_screen
    assert type(sclens.screen).__name__ == "module" and type(sclens.extract).__name__ == "module"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sclens.nope  # noqa: B018
    light = subprocess.run([sys.executable, "-c", "import sys, sclens; print('torch' in sys.modules)"],
                           capture_output=True, text=True, check=True)
    assert light.stdout.strip() == "False"  # import sclens stays light
