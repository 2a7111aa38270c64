"""The placement layer stays pure: importing it loads no I/O, torch or scipy."""

from __future__ import annotations

import inspect
import subprocess
import sys

import libpipe.placement


def test_import_is_pure():
    code = (
        "import sys, libpipe.placement\n"
        "heavy = {'trio', 'torch', 'scipy', 'socket', 'libpipe.net', 'libpipe.swarm'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_public_classes_and_functions_are_our_own():
    for name in (n for n in dir(libpipe.placement) if not n.startswith("_")):
        obj = getattr(libpipe.placement, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__.startswith("libpipe.placement."), name
