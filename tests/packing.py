"""Shared test helper: packed-row layouts."""

import numpy as np


def packed_layout(rows: list[list[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Document lengths per row -> positions and segment ids, int32 (B, T); 0 marks padding."""
    pos = np.zeros((len(rows), seq_len), np.int32)
    seg = np.zeros((len(rows), seq_len), np.int32)
    for r, lengths in enumerate(rows):
        t = 0
        for i, n in enumerate(lengths):
            pos[r, t:t + n], seg[r, t:t + n] = np.arange(n), i + 1
            t += n
    return pos, seg
