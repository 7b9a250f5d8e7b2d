"""Progress bars of the command line (``ldm-serve client ...``, ``generate``, ``inpaint``), on stderr.

One status line while a job is queued (its queue position), then one bar per image
counting denoising steps; an image's bar closes when the image is done. Off with
``--quiet``, with ``--progress never``, and by default when stderr is not a terminal
(``--progress always`` forces it on, e.g. to capture it). tqdm is imported only when a
bar is shown.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

PROGRESS_MODES = ("auto", "always", "never")
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| step {n_fmt}/{total_fmt} [{elapsed}]"


def progress_enabled(mode: str, quiet: bool, stream: TextIO | None = None) -> bool:
    """Whether to draw bars: never when quiet; ``auto`` only on a terminal."""
    if quiet or mode == "never":
        return False
    if mode == "always":
        return True
    out = stream or sys.stderr
    return bool(getattr(out, "isatty", lambda: False)())


def add_progress_args(parser: Any) -> None:
    """``--progress {auto,always,never}`` and ``--quiet``."""
    parser.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                        help="progress bars on stderr: auto = only on a terminal (default)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes")


class JobProgress:
    """The bars of one job of ``n`` images (``seeds[i]`` labels image i when known).

    Every method is a no-op when ``enabled`` is false.
    """

    def __init__(self, enabled: bool, n: int, seeds: list[int] | None = None, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.n = n
        self.seeds = seeds
        self.stream = stream or sys.stderr
        self._status: Any = None
        self._bars: dict[int, Any] = {}
        self._done: set[int] = set()

    def _tqdm(self, leave: bool = True, **kw: Any) -> Any:
        from tqdm import tqdm

        return tqdm(file=self.stream, dynamic_ncols=True, leave=leave, mininterval=0, **kw)

    def queued(self, position: int | None) -> None:
        """The job waits in the queue (``position`` 0 = next)."""
        if not self.enabled:
            return
        text = "queued" + (f" (queue position {position})" if position is not None else "")
        if self._status is None:
            self._status = self._tqdm(leave=False, total=None, bar_format="{desc}")  # gone once running
        self._status.set_description_str(text)

    def _close_status(self) -> None:
        if self._status is not None:
            self._status.close()
            self._status = None

    def step(self, step: int, total: int, row: int | None = None) -> None:
        """Step ``step`` of ``total`` done for image ``row`` (None: every unfinished image)."""
        if not self.enabled:
            return
        self._close_status()
        rows = [row] if row is not None else [i for i in range(self.n) if i not in self._done]
        for i in rows:
            bar = self._bar(i, total)
            bar.update(max(0, min(step, total) - bar.n))

    def _bar(self, i: int, total: int) -> Any:
        bar = self._bars.get(i)
        if bar is None:
            seed = f" (seed {self.seeds[i]})" if self.seeds and i < len(self.seeds) else ""
            # no rate: steps replayed from the event stream arrive in bursts
            bar = self._tqdm(total=total, desc=f"image {i}{seed}", bar_format=BAR_FORMAT)
            self._bars[i] = bar
        elif bar.total != total:
            bar.total = total
            bar.refresh()
        return bar

    def image_done(self, index: int) -> None:
        """Image ``index`` is finished: its bar is completed and closed."""
        self._done.add(index)
        bar = self._bars.pop(index, None)
        if bar is not None:
            if bar.total:
                bar.update(bar.total - bar.n)
            bar.close()

    def close(self) -> None:
        """Close every bar still open (before printing anything else)."""
        if self._status is not None:
            self._status.close()
            self._status = None
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
