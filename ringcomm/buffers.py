"""Preallocated scratch buffers, so the hot loop allocates nothing per step.

An algorithm asks for ``n`` elements shaped like its tensor; the pool hands back
a view of a cached buffer for that (dtype, device, slot), growing it only when a
larger request arrives. Steady-state training (the same bucket sizes every
step) therefore allocates nothing after the first step.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["ScratchPool"]


class ScratchPool:
    """Growing scratch buffers keyed by (dtype, device, slot)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}
        self._lock = threading.Lock()

    def get(self, numel: int, like: torch.Tensor, slot: int = 0) -> torch.Tensor:
        """A 1-D tensor of ``numel`` elements with ``like``'s dtype and device.

        Different ``slot`` numbers give non-overlapping buffers (for algorithms
        that need several at once). Contents are undefined.
        """
        key = (like.dtype, like.device, slot)
        with self._lock:
            buf = self._buffers.get(key)
            if buf is None or buf.numel() < numel:
                buf = torch.empty(max(numel, 1), dtype=like.dtype, device=like.device)
                self._buffers[key] = buf
        return buf[:numel]

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()
