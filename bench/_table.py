"""Plain-text result tables: what every benchmark module returns and `python -m bench` prints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Table:
    """A titled grid of already-formatted cells, with notes printed under it.

    `align` has one letter per column, `l` or `r`; by default the first column is
    left-aligned and the others right-aligned (figures). `misses` counts the
    targets this table reports as missed (`--strict` exits non-zero on any).
    """

    title: str
    columns: Sequence[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    align: str = ""
    misses: int = 0

    def add(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(
                f"{self.title}: row has {len(cells)} cells for {len(self.columns)} columns"
            )
        self.rows.append([str(c) for c in cells])

    def render(self) -> str:
        align = self.align or "l" + "r" * (len(self.columns) - 1)
        widths = [len(c) for c in self.columns]
        for row in self.rows:
            widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            out = [
                cell.rjust(w) if a == "r" else cell.ljust(w)
                for cell, w, a in zip(cells, widths, align, strict=True)
            ]
            return "  ".join(out).rstrip()

        rule = "  ".join("-" * w for w in widths)
        parts = [self.title, "=" * len(self.title), line(self.columns), rule]
        parts += [line(r) for r in self.rows]
        parts += self.notes
        return "\n".join(parts)


def ratio(x: float) -> str:
    return f"{x:.2f}x"


def micros(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.1f}" if us < 100 else f"{us:.0f}"
