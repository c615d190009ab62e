"""Plain-text tables for the terminal: the demo's summary, `moe-lbl analyze`, the benchmarks."""

from __future__ import annotations


def format_table(rows: list[dict], columns: list[str], rule: bool = True) -> str:
    """One line per row under a header of `columns`; the first column left-aligned, the others right.

    A missing cell is blank; `rule` puts a line of dashes under the header.
    """
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]

    def line(values):
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    lines = [line(columns)] + (["  ".join("-" * w for w in widths)] if rule else []) + [line(r) for r in cells]
    return "\n".join(lines)
