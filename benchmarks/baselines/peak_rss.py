"""Peak resident memory of a block of code (the LM pruning script and the llmcompressor runner).

Standard library and psutil only, so it imports in llmcompressor's own venv too.
"""

from __future__ import annotations

import threading
import time


class PeakRSS:
    """Peak resident set size above the start, sampled every 5 ms in a thread (MiB)."""

    def __enter__(self):
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mib = (self.peak - self.start) / 2**20
