"""``learnedopt.markdown``: names of any origin kept whole in Markdown (table cells, lines, inline code)."""

from __future__ import annotations

import pytest

from learnedopt import markdown


def test_a_cell_escapes_pipes_and_puts_line_breaks_as_spaces() -> None:
    assert markdown.cell("a|b") == "a\\|b"
    assert markdown.cell("a\nb\r\nc\rd") == "a b c d"
    assert markdown.cell(3) == "3"
    assert markdown.row(["x|y", "**1**", 2]) == "| x\\|y | **1** | 2 |"


def test_a_line_keeps_pipes_and_joins_lines() -> None:
    assert markdown.line("## a|b\nc") == "## a|b c"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain", "`plain`"),
        ("a`b", "``a`b``"),
        ("a``b`c", "```a``b`c```"),
        ("`a", "`` `a ``"),  # a span may not start or end with its fence's character: padded
        ("a`", "`` a` ``"),
        ("a\nb", "`a b`"),
        # CommonMark strips one space from each end of a span that starts and ends with one
        (" a ", "`  a  `"),
        (" a", "` a`"),
        ("  ", "`  `"),  # spaces only: nothing stripped
    ],
)
def test_inline_code_holds_any_backticks_and_spaces(text: str, expected: str) -> None:
    assert markdown.code(text) == expected
