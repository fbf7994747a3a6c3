"""``axolotl_dskd.core.packing``: which sample each position of a packed row belongs to."""

from __future__ import annotations

from axolotl_dskd.core.packing import sample_segments


def test_sample_segments() -> None:
    assert sample_segments([1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 0, 1]) == [0, 0, 1, 1, -1, -1]
    assert sample_segments([1, 2, 2, 3, 0], [0, 0, 1, 0, 5]) == [0, 1, 1, 2, -1]
    assert sample_segments([1, 1, 1], [3, 4, 2]) == [0, 0, 1]  # a restart that skips 0
    assert sample_segments([1, 1, 0], None) == [0, 0, -1]
