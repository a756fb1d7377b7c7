"""Preallocated scratch buffers, so the hot loop allocates nothing per step.

An algorithm asks for ``n`` elements shaped like its tensor and gets a view of
a cached buffer for that (dtype, device), grown only when a larger request
arrives; an algorithm that needs several buffers at once takes one and slices
it. Steady-state training (the same bucket sizes every step) therefore
allocates nothing after the first step.

One pool per world (``session.py``), used by one collective at a time: the
comm queue runs collectives one after another, so two calls never share a
buffer while both are in flight.
"""

from __future__ import annotations

import torch

__all__ = ["ScratchPool"]


class ScratchPool:
    """Growing scratch buffers keyed by (dtype, device)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, numel: int, like: torch.Tensor) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements with ``like``'s dtype and device; contents undefined."""
        key = (like.dtype, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
            self._buffers[key] = buf
        return buf[:numel]
