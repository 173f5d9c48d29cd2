"""``python -m keydiff``."""

from keydiff.cli import entry_point

entry_point()
