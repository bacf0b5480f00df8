"""Plain-text tables and CSV for the app's results (no terminal library needed).

>>> print(table(["class", "recall"], [["cat", "0.50"], ["dog", "1.00"]], right={1}))
class  recall
-----  ------
cat      0.50
dog      1.00
"""

from __future__ import annotations

import csv
import io
from collections.abc import Collection, Sequence

__all__ = ["csv_text", "table"]


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], right: Collection[int] = ()
) -> str:
    """Columns padded to their widest cell; columns in ``right`` are right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ).rstrip()

    return "\n".join(
        [line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]]
    )


def csv_text(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """RFC 4180 CSV with a header row.

    >>> csv_text(["a", "b"], [[1, "x,y"]])
    'a,b\\r\\n1,"x,y"\\r\\n'
    """
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(headers)
    w.writerows(rows)
    return buf.getvalue()
