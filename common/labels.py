"""labels.txt: one class name per line, line i = class i, UTF-8. The one reader for every stage."""
from __future__ import annotations

from pathlib import Path


def read_labels(path: str | Path) -> list[str]:
    """Class names from `path` (UTF-8, a byte-order mark dropped); trailing blank lines are ignored, any other
    blank line is an error."""
    try:
        labels = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    while labels and not labels[-1].strip():
        labels.pop()
    blank = [i for i, label in enumerate(labels) if not label.strip()]
    if not labels or blank:
        raise ValueError(f"{path}: expected one non-empty label per line"
                         + (f" (line {blank[0] + 1} is blank)" if blank else " (the file is empty)"))
    return labels


def write_labels(path: str | Path, labels: list[str]) -> None:
    """`labels` one per line, UTF-8, '\\n' line ends (Triton's label files are split on '\\n' alone)."""
    Path(path).write_text("".join(f"{label}\n" for label in labels), encoding="utf-8", newline="")
