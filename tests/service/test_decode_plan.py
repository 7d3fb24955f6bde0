"""How many decode loops and intra-op threads a model gets from MT_DECODE_LOOPS / MT_THREADS and the cores."""

from __future__ import annotations

import os

import pytest

from service import state
from service.settings import Settings


@pytest.mark.parametrize(
    ("cores", "loops", "threads", "device", "expected"),
    [
        (2, 0, 0, "cpu", (2, 1)),  # auto: a loop per core, one thread each
        (16, 0, 0, "cpu", (4, 4)),  # at most 4 loops, the cores shared among them
        (1, 0, 0, "cpu", (1, 1)),
        (2, 1, 0, "cpu", (1, 0)),  # one loop asked: onnxruntime's default threads, as before loops existed
        (8, 2, 0, "cpu", (2, 4)),
        (8, 0, 3, "cpu", (4, 3)),  # threads as set
        (8, 0, 0, "cuda", (1, 0)),  # the GPU: one loop, onnxruntime's default
    ],
)
def test_decode_plan(
    monkeypatch: pytest.MonkeyPatch, cores: int, loops: int, threads: int, device: str, expected: tuple[int, int]
) -> None:
    monkeypatch.setattr(state, "cpu_cores", lambda: cores)
    assert state.decode_plan(Settings(decode_loops=loops, threads=threads), device) == expected


def test_cpu_cores_is_at_least_one_and_at_most_the_affinity() -> None:
    assert 1 <= state.cpu_cores() <= len(os.sched_getaffinity(0))
