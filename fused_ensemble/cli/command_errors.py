"""User mistakes on the command line (a bad argument, a missing or unreadable file): one line on stderr and exit
code 2, as argparse reports a bad option, instead of a traceback."""

from __future__ import annotations

import sys

USAGE_ERROR = 2


class CommandError(Exception):
    """A mistake in what the user asked for; its message is the whole report."""


def report(command: str, error: CommandError) -> int:
    print(f"fused-ensemble {command}: error: {error}", file=sys.stderr)
    return USAGE_ERROR
