"""RowGather: row gathers into reused buffers give np.take's result, even when gathering their own last result."""

from __future__ import annotations

import numpy as np
import pytest

from model.runtime import RowGather


def test_row_gather_equals_take_and_reuses_its_buffers() -> None:
    rng = np.random.default_rng(0)
    gather = RowGather()
    cache = rng.standard_normal((6, 2, 3, 4)).astype(np.float32)
    expected = cache.copy()
    for step in range(12):
        index = rng.integers(0, expected.shape[0], size=int(rng.integers(1, 7)))
        fresh = rng.standard_normal((6, 2, 3 + step, 4)).astype(np.float32)
        # Alternate: gather from a fresh array (as from the decoder's outputs) or from the last result itself.
        source, reference = (fresh, fresh.copy()) if step % 3 == 0 else (cache, expected)
        cache = gather("past", source, index)
        expected = np.take(reference, index, axis=0)
        np.testing.assert_array_equal(cache, expected)
        assert cache.flags.c_contiguous
    # Later results live in the same two buffers as the first ones (no new allocation per step).
    later = [gather("past", np.ones((2, 2, 3, 4), np.float32), np.array([0, 1])) for _ in range(3)]
    assert any(np.shares_memory(a, b) for a in later for b in later if a is not b)
    with pytest.raises(IndexError, match="out of range"):
        gather("past", np.ones((2, 2, 3, 4), np.float32), np.array([0, 2]))
    # Another slot never shares buffers with this one.
    other = gather("cross", np.ones((2, 2, 3, 4), np.float32), np.array([1, 0]))
    assert not any(np.shares_memory(other, a) for a in later)
