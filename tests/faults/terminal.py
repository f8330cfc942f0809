"""What a failed command's terminal output must be: one clear failure (docs/failures.md).

No Python traceback and no `NoneType: None` anywhere, and stderr ends with the paragraph that
names the problem, after every log line.
"""

from __future__ import annotations

import re

TRACEBACK = "Traceback (most recent call last)"
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d{3} \| ", re.MULTILINE)  # Prefect's console format


def last_paragraph(text: str) -> str:
    """The text after the last blank line."""
    return text.strip().split("\n\n")[-1]


def assert_one_clear_failure(stdout: str, stderr: str, starts: str, *words: str) -> str:
    """The whole output shows no traceback, and stderr ends with a paragraph that starts with
    `starts` and names `words`; returns that paragraph."""
    whole = stdout + stderr
    assert TRACEBACK not in whole, whole[-6000:]
    assert "NoneType: None" not in whole, whole[-6000:]
    paragraph = last_paragraph(stderr)
    assert paragraph.startswith(starts), stderr[-3000:]
    assert not LOG_LINE.search(paragraph), f"log lines after the failure's paragraph:\n{paragraph}"
    for word in words:
        assert word in paragraph, paragraph
    return paragraph
