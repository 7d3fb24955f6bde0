"""mt-serve with an engine that raises on FAULT_TEXT and stalls on SLOW_TEXT: a script for fault tests.

A decoder step raises while FAULT_TEXT is in the running batch, and stalls once when SLOW_TEXT joins it;
the static decode (the batcher's per-request retry after a failed step) does the same.

Run as ``python tests/service/fault_server.py --model DIR --port P``; ``FAULT_SLOW_S`` sets the stall.
"""

from __future__ import annotations

import os
import sys
import time

from service.cli import main
from service.engine import Engine, EngineBatch

FAULT_TEXT = "w11 w11 w11 w11 w11"
SLOW_TEXT = "w10 w10 w10 w10 w10"

_translate_batch = Engine.translate_batch
_step = EngineBatch.step


def step(self: EngineBatch):
    live = [self.engine.tokenizer.decode(source) for source, _ in self.sources.values()]
    joining = [self.engine.tokenizer.decode(source) for _, source, _ in self.batch.pending]
    if FAULT_TEXT in live:
        raise RuntimeError("injected fault")
    if SLOW_TEXT in joining:
        time.sleep(float(os.environ.get("FAULT_SLOW_S", "1")))
    return _step(self)


def translate_batch(self: Engine, sources, options):
    texts = [self.tokenizer.decode(list(source)) for source in sources]
    if FAULT_TEXT in texts:
        raise RuntimeError("injected fault")
    if SLOW_TEXT in texts:
        time.sleep(float(os.environ.get("FAULT_SLOW_S", "1")))
    return _translate_batch(self, sources, options)


if __name__ == "__main__":
    Engine.translate_batch = translate_batch
    EngineBatch.step = step
    sys.exit(main())
