"""How long the Qt event loop stops answering: the longest gap between the ticks of a fast timer.

A GUI freezes when its main thread is busy: a timer that should fire every
``interval_ms`` then fires late. :class:`StallProbe` records every gap between
ticks while its block runs::

    with StallProbe(interval_ms=10) as probe:
        qtbot.mouseClick(widget.learn.native, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: not widget.busy, timeout=30_000)   # processes events meanwhile
    probe.max_ms   # the longest the GUI did not respond, in ms (about interval_ms when it never stalls)

The block must let Qt process events (``qtbot.wait``, ``waitUntil``, or
``QApplication.processEvents`` in a loop); a block that runs long work in the
main thread shows up as one long gap. A QApplication must exist.
"""

from __future__ import annotations

import time
from types import TracebackType

from qtpy.QtCore import Qt, QTimer


class StallProbe:
    """A context manager that measures the event loop's stalls with a ``interval_ms`` Qt timer.

    Attributes:
        interval_ms: the timer's period (ms).
        gaps_ms: every gap between consecutive ticks (ms), including the gap from the last
            tick to the end of the block.
        max_ms: the longest gap (ms); 0.0 before the block ends when no tick came yet.
    """

    def __init__(self, interval_ms: int = 10):
        self.interval_ms = int(interval_ms)
        self.gaps_ms: list[float] = []
        self._timer = QTimer()
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(self.interval_ms)
        self._timer.timeout.connect(self._tick)
        self._last = 0.0

    @property
    def max_ms(self) -> float:
        return max(self.gaps_ms, default=0.0)

    def stalls(self, threshold_ms: float) -> int:
        """How many gaps were longer than ``threshold_ms``."""
        return sum(gap > threshold_ms for gap in self.gaps_ms)

    def _tick(self) -> None:
        now = time.perf_counter()
        self.gaps_ms.append((now - self._last) * 1000.0)
        self._last = now

    def __enter__(self) -> StallProbe:
        self.gaps_ms.clear()
        self._last = time.perf_counter()
        self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self._timer.stop()
        self._tick()  # a block that ends inside a stall counts it too

    def __repr__(self) -> str:
        return f"StallProbe(interval_ms={self.interval_ms}, ticks={len(self.gaps_ms)}, max_ms={self.max_ms:.1f})"
