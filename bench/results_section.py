"""Replace one `## title` section of bench/RESULTS.md, leaving the other benchmarks' sections as they are."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.io import write_text_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Put `## title` + body where that section was (or at the end), up to the next `## ` heading."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    lines = text.splitlines()
    heading = f"## {title}"
    section = [heading, "", *body.strip().splitlines(), ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
    else:
        lines += ["", *section]
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
