"""labels.txt: one class name per line, line i = class i. The one reader for every stage."""
from __future__ import annotations

from pathlib import Path


def read_labels(path: str | Path) -> list[str]:
    """Class names from `path`; trailing blank lines are ignored, any other blank line is an error."""
    labels = Path(path).read_text().splitlines()
    while labels and not labels[-1].strip():
        labels.pop()
    blank = [i for i, label in enumerate(labels) if not label.strip()]
    if not labels or blank:
        raise ValueError(f"{path}: expected one non-empty label per line"
                         + (f" (line {blank[0] + 1} is blank)" if blank else " (the file is empty)"))
    return labels
