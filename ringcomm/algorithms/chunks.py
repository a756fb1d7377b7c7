"""How a flat tensor of ``numel`` elements splits into ``parts`` contiguous chunks.

Pure integer arithmetic, no torch: the ring, the parameter server and the cost
model all agree on chunk boundaries through this one function.

When ``numel`` is not divisible by ``parts`` the first ``numel % parts`` chunks
get one extra element, so chunk sizes differ by at most one::

    numel = 10, parts = 4   ->   sizes 3 3 2 2   starts 0 3 6 8

``numel`` may be 0 or smaller than ``parts``; trailing chunks are then empty.

``core_size`` (P', the power-of-two core that rhd and rd fold a world into, ``fold.py``) is the same
kind of arithmetic, and lives here so that the cost model can count with it without torch.
"""

from __future__ import annotations

__all__ = ["CHAIN_SEGMENT_BYTES", "chunk_bounds", "chunk_sizes", "core_size", "segment_count"]


def chunk_sizes(numel: int, parts: int) -> list[int]:
    """Sizes (in elements) of ``parts`` chunks covering ``numel`` elements."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    base, extra = divmod(numel, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def chunk_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """``(start, length)`` of each of ``parts`` chunks, in order, covering ``[0, numel)``."""
    bounds = []
    start = 0
    for size in chunk_sizes(numel, parts):
        bounds.append((start, size))
        start += size
    return bounds


def core_size(world_size: int) -> int:
    """P', the largest power of two <= ``world_size`` (ranks 0..P'-1 form the core of a fold)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return 1 << (world_size.bit_length() - 1)


#: The pipelined chain broadcast's default segment (``chain.py``; bytes): small enough that a large
#: tensor keeps every link of the chain busy, large enough that alpha is paid rarely. Here, torch-free,
#: so that the cost model counts the segments with the same number.
CHAIN_SEGMENT_BYTES = 1 << 20


def segment_count(numel: int, element_size: int, segment_bytes: int) -> int:
    """How many segments of at most ``segment_bytes`` (whole elements, at least one each) cut ``numel``."""
    per = max(1, segment_bytes // max(element_size, 1))
    return max(1, -(-numel // per))
