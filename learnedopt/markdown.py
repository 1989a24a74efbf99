"""Text of any origin (labels, problem names, paths, commands) placed in Markdown unchanged in
meaning: in a table cell, on one line (a heading, a list item), or as inline code.

The report writers of :mod:`learnedopt.evaluation` and of ``benchmarks/`` use these, so that a
name with ``|``, a line break or a backtick in it does not split a table row or end a code span.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def line(text: object) -> str:
    """``text`` on one line: each line break a space (a break ends a heading, a table row, or
    a list item's first line)."""
    return _LINE_BREAK.sub(" ", str(text))


def cell(text: object) -> str:
    """``text`` as the content of one table cell: on one :func:`line`, with every ``|`` written
    ``\\|`` (GitHub Markdown shows ``|``, also inside inline code)."""
    return line(text).replace("|", "\\|")


def row(cells: Iterable[object]) -> str:
    """A table row of ``cells``, each through :func:`cell`."""
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def code(text: object) -> str:
    """``text`` as inline code on one :func:`line`: fenced by one backtick more than its longest
    run of backticks, and padded with a space on each side where it starts or ends with a
    backtick, or starts and ends with a space (CommonMark strips one space from each side of a
    span that has both and is not all spaces). Not escaped for a table: put it through
    :func:`cell` there."""
    text = line(text)
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    spaced = text.startswith(" ") and text.endswith(" ") and text.strip(" ") != ""
    pad = " " if text.startswith("`") or text.endswith("`") or spaced else ""
    return f"{fence}{pad}{text}{pad}{fence}"
