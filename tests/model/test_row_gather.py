"""RowGather: row gathers into reused buffers give np.take's result, even when gathering their own last result."""

from __future__ import annotations

import numpy as np
import pytest

from model.runtime import RowGather


def test_row_gather_equals_take_and_reuses_its_buffers() -> None:
    rng = np.random.default_rng(0)
    gather = RowGather(small=0)  # every result in the reused buffers
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


def test_small_results_are_fresh_arrays_and_many_checks_the_index_once() -> None:
    rng = np.random.default_rng(1)
    gather = RowGather(small=1000)
    small = [rng.standard_normal((4, 2, 3, 4)).astype(np.float32) for _ in range(3)]  # 96 elements each
    large = [rng.standard_normal((4, 4, 20, 4)).astype(np.float32) for _ in range(3)]  # 1,280 each
    index = np.array([3, 0, 0, 2])
    for arrays in (small, large):
        out = gather.many("past", arrays, index)
        for got, array in zip(out, arrays, strict=True):
            np.testing.assert_array_equal(got, np.take(array, index, axis=0))
            assert got.flags.c_contiguous
    # Large results gathered from their own previous ones (a beam reorder of the last step's cache) stay right.
    again = gather.many("past", out, index)
    for got, array in zip(again, large, strict=True):
        np.testing.assert_array_equal(got, np.take(np.take(array, index, axis=0), index, axis=0))
    with pytest.raises(IndexError, match="out of range for 4 rows"):
        gather.many("past", small, np.array([0, -1]))
    # A non-contiguous view (the continuous batch's trimmed cache) comes back contiguous.
    view = large[0][:, :, 5:]
    np.testing.assert_array_equal(gather("trim", view, index), np.take(view, index, axis=0))


@pytest.mark.parametrize("small", [0, 10_000])  # into the reused buffers, and as fresh arrays
def test_zeros_rows_follow_the_gathered_ones_even_in_a_reused_dirty_buffer(small: int) -> None:
    rng = np.random.default_rng(2)
    gather = RowGather(small=small)
    arrays = [rng.standard_normal((5, 2, 3, 4)).astype(np.float32) for _ in range(2)]
    gather.many("past", arrays, np.arange(5))  # fills a buffer with non-zero values
    gather.many("past", arrays, np.arange(5))  # and the second one
    index = np.array([4, 1])
    for got, array in zip(gather.many("past", arrays, index, zeros=3), arrays, strict=True):
        assert got.shape == (5, 2, 3, 4) and got.flags.c_contiguous
        np.testing.assert_array_equal(got[:2], np.take(array, index, axis=0))
        assert not got[2:].any()
