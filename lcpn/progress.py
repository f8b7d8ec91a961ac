"""Progress of long loops: a tqdm bar on a terminal, plain lines where stderr is a file or a pipe.

tqdm hides its bar when stderr is not a terminal, so a log of a long features-mode run would
show nothing until the end; ``ProgressLines`` writes one line at every tenth of the work (and
at least every minute) instead.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class ProgressLines:
    """``desc: done/total unit (pct%), rate unit/s, about N s left`` lines on stderr."""

    def __init__(self, total: int, desc: str, unit: str = "img", every_s: float = 60.0) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done, self.next_tenth = 0, 1
        self.start = self.last_line = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        tenth = self.done * 10 // max(self.total, 1)
        if tenth >= self.next_tenth or now - self.last_line >= self.every_s:
            self.next_tenth, self.last_line = tenth + 1, now
            rate = self.done / max(now - self.start, 1e-9)
            left = f", about {(self.total - self.done) / rate:.0f} s left" if self.done < self.total else ""
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%), "
                  f"{rate:.1f} {self.unit}/s{left}", file=sys.stderr, flush=True)  # fmt: skip

    def close(self) -> None:
        """Nothing to clear: the lines stay (tqdm's bars need closing, so both have it)."""


def progress(total: int, desc: str, unit: str = "img", leave: bool = True) -> tqdm | ProgressLines:
    """A progress bar on a terminal, else progress lines; both take ``update(n)`` and ``close()``."""
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return ProgressLines(total, desc, unit)
