"""Output that reads well on a terminal and parses well off one.

On a terminal: rich (colours, a live progress bar, tables fitted to the
window). Off a terminal (a pipe, a CI log, a file): no wrapping, no
truncation, no colour codes -- a line is a line however long it is -- and no
live widgets (``pviommu run`` prints periodic progress lines instead).
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console

#: Wide enough that nothing printed off a terminal is ever wrapped or truncated.
UNWRAPPED_WIDTH = 1 << 16


def make_console(stderr: bool = False, file: TextIO | None = None) -> Console:
    stream = file or (sys.stderr if stderr else sys.stdout)
    if stream.isatty():
        return Console(file=stream, stderr=stderr)
    return Console(file=stream, width=UNWRAPPED_WIDTH, soft_wrap=True, no_color=True, highlight=False,
                   emoji=False, color_system=None, force_terminal=False)


def say(console: Console, message: str) -> None:
    """A status line: rich's timestamped log on a terminal, the plain text off it."""
    if console.is_terminal:
        console.log(message, markup=False, highlight=False)
    else:
        console.print(message, markup=False, highlight=False)
