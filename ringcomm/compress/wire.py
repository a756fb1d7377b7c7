r"""A narrower dtype on the wire, the tensor's own dtype for the sums: ``all_reduce(..., wire_dtype="bf16")``.

Every message an all-reduce algorithm sends is cast to the wire dtype (bfloat16 or float16), and every
message it receives is cast back to the tensor's dtype (float32 or float64) before it is reduced into
the destination, so each hop adds in the wide dtype::

    rank a: x_a --round--> bf16 ==wire==> rank b: x_b + float32(bf16)   (summed in float32)

unlike DDP's ``fp16_compress_hook``, which casts the whole gradient to fp16 once and sums in fp16 at
every hop. It is done once, in ``WireTransport`` (a ``Transport`` wrapped around the real one), so
every algorithm gets it without knowing: ring, rhd, rd, ps, naive, auto's pick.

**Rounding, and why the ranks still agree bitwise.** A send rounds the tensor it sends *in place*
before it goes (``x <- float32(bf16(x))``), so the sender keeps exactly what the receivers get: the
owner of a ring chunk and its receivers hold the same bits, and in recursive doubling both partners
add the same two rounded vectors. A value rounded twice is unchanged, so sending a result to several
peers (ps, naive) rounds it once. One case is left: a rank that sends its result on to another
(recursive doubling's fold-out at P = 3) holds it rounded while its core partner does not; so the
call ends by rounding the whole result once more (``round_result``), a no-op where it already was,
and every rank holds the same bits, a value of the wire dtype.

**Error bound.** With u the wire dtype's unit roundoff (2^-8 for bf16, 2^-11 for fp16) each rounding
of a partial sum s errs by at most u·|s| <= u·Σ|x_i|; a value passes at most L roundings on its way
(ring: P-1 hops of the reduce-scatter and the all-gather's one; rhd/rd add the fold's), so

    |result - exact| <= L·u·(1+u)^L·Σ|x_i|  +  the tensor dtype's own (P-1)·eps/2·Σ|x_i|

**Bytes** (``cost.wire_bytes``): every algorithm's bytes times w/e, w and e the wire and tensor
element sizes: a float32 tensor with bf16 on the wire sends half the bytes, the same messages.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops import reduce_into
from ..transports.base import Message, MessageKind, Pending, PendingOp, Transport

__all__ = ["WIRE_DTYPES", "WireTransport", "check_wire_dtype", "round_result", "wire_dtype"]

#: what ``wire_dtype=`` takes, and the torch dtype each names.
WIRE_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: the tensor dtypes a narrower wire applies to (wider than both wire dtypes).
_WIDE = (torch.float32, torch.float64)


def wire_dtype(name: object) -> torch.dtype | None:
    """The torch dtype ``wire_dtype=name`` means (None for None or "none"); ValueError otherwise."""
    if name is None or name == "none":
        return None
    if isinstance(name, str) and name in WIRE_DTYPES:
        return WIRE_DTYPES[name]
    raise ValueError(f"wire_dtype={name!r}: expected one of None, 'none', {', '.join(map(repr, WIRE_DTYPES))}")


def check_wire_dtype(name: object, tensor: torch.Tensor) -> torch.dtype | None:
    """``wire_dtype(name)``, refused (ValueError, one line) for a tensor it cannot apply to."""
    dtype = wire_dtype(name)
    if dtype is not None and tensor.dtype not in _WIDE:
        raise ValueError(
            f"wire_dtype={name!r} needs a float32 or float64 tensor (it sums in the tensor's dtype); "
            f"the tensor is {str(tensor.dtype).removeprefix('torch.')}"
        )
    return dtype


def round_result(flat: torch.Tensor, dtype: torch.dtype) -> None:
    """``flat <- flat`` rounded to ``dtype`` and back, in place: the last step of a wire-dtype all-reduce."""
    flat.copy_(flat.to(dtype))


class _Landing:
    """A receive (plain or reduce) into ``target`` through a wire-dtype buffer, applied when waited."""

    __slots__ = ("inner", "target", "buf", "op", "before", "done")

    def __init__(self, target: torch.Tensor, buf: torch.Tensor, op: str, before: _Landing | None) -> None:
        self.inner: Pending | None = None
        self.target, self.buf, self.op = target, buf, op  # op "" means overwrite
        self.before = before  # the reduce into the same tensor posted just before: applied first
        self.done = False


class _Outgoing:
    """A send of a wire-dtype copy, kept alive until waited."""

    __slots__ = ("inner", "buf")

    def __init__(self, inner: Pending, buf: torch.Tensor) -> None:
        self.inner, self.buf = inner, buf


class WireTransport:
    """``inner`` with every message carried as ``dtype`` (see the module docstring).

    Sends round their tensor in place and send a ``dtype`` copy; receives and reduces land in a
    ``dtype`` buffer and are applied to the destination (in the destination's dtype) when waited,
    reduces into one tensor in the order they were posted. ``stats`` is the inner transport's: it
    counts the bytes that went on the wire.
    """

    def __init__(self, inner: Transport, dtype: torch.dtype) -> None:
        self.inner, self.dtype = inner, dtype
        self.rank, self.world_size, self.device_type = inner.rank, inner.world_size, inner.device_type
        self.stats = inner.stats
        self._reduces: dict[tuple[int, int, torch.dtype], _Landing] = {}

    def post(self, messages: Sequence[Message]) -> list[Pending]:
        wire: list[Message] = []
        landings: dict[int, _Landing] = {}
        sends: dict[int, torch.Tensor] = {}
        for i, m in enumerate(messages):
            if m.kind is MessageKind.SEND:
                buf = m.tensor.to(self.dtype)
                m.tensor.copy_(buf)  # the sender keeps what the receivers get: the ranks agree bitwise
                sends[i] = buf
                wire.append(Message(MessageKind.SEND, buf, m.peer, m.tag))
            else:
                buf = torch.empty(m.tensor.shape, dtype=self.dtype, device=m.tensor.device)
                before = None
                if m.kind is MessageKind.REDUCE:
                    key = (m.tensor.data_ptr(), m.tensor.numel(), m.tensor.dtype)
                    before = self._reduces.get(key)
                    landings[i] = self._reduces[key] = _Landing(m.tensor, buf, m.op, before)
                else:
                    landings[i] = _Landing(m.tensor, buf, "", None)
                wire.append(Message(MessageKind.RECV, buf, m.peer, m.tag))
        pending = self.inner.post(wire)
        out: list[Pending] = []
        for i, p in enumerate(pending):
            if i in landings:
                landings[i].inner = p
                out.append(Pending(PendingOp.RECV, p.peer, landings[i]))
            else:
                out.append(Pending(PendingOp.SEND, p.peer, _Outgoing(p, sends[i])))
        return out

    def wait(self, pending: Pending, deadline: float) -> None:
        handle = pending.handle
        if isinstance(handle, _Outgoing):
            self.inner.wait(handle.inner, deadline)
        else:
            self._land(handle, deadline)

    def _land(self, landing: _Landing, deadline: float) -> None:
        if landing.done:
            return
        if landing.before is not None:  # reduces into one tensor land in posting order (ps: rank order)
            self._land(landing.before, deadline)
        self.inner.wait(landing.inner, deadline)  # type: ignore[arg-type]  (set by post)
        wide = landing.buf.to(landing.target.dtype)
        if landing.op:
            reduce_into(landing.target, wide, landing.op)  # summed in the tensor's own dtype
            key = (landing.target.data_ptr(), landing.target.numel(), landing.target.dtype)
            if self._reduces.get(key) is landing:
                del self._reduces[key]
        else:
            landing.target.copy_(wide)
        landing.done, landing.before = True, None

    def close(self) -> None:
        """The inner transport is the session's: it closes it."""
