"""The benchmarks' measure of host time: how long a model's onnxruntime runs take, so the rest of the wall
time is the Python around them (the search, the cache bookkeeping, the feeds)."""

from __future__ import annotations

import time

from model.runtime import OrtModel


class SessionClock:
    """Seconds spent inside the model's onnxruntime runs (the sessions' run methods wrapped per instance)."""

    def __init__(self, model: OrtModel) -> None:
        self.seconds = 0.0
        for session in (model.encoder, model.decoder):
            for name in ("run", "run_with_iobinding"):
                setattr(session, name, self._timed(getattr(session, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed
