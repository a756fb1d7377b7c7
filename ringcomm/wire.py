r"""The wire format of one message header: what a receiver checks before it writes a byte.

Used by every transport that carries its own headers (ZeroMQ, ``zmq_transport.py``).
A header is a msgpack map of eight fields, about 70 bytes::

    {"v": 1, "src": 2, "dst": 3, "tag": 0, "seq": 17,
     "dtype": "float32", "shape": [262144], "nbytes": 1048576}

``seq`` counts messages per (source, destination, tag) from 0, so a lost,
duplicated or replayed message is caught, not silently reduced twice.

**Validation.** Nothing is ever unpickled. A header is decoded with msgpack
(``raw=False``, ``strict_map_key=True``, no ext types, small limits) and must be
a map with exactly the expected keys and types. A wrong version, ``src``
differing from who delivered it, ``dst`` not this rank, a dtype outside
``DTYPES``, or a shape/nbytes that disagree raise ``FrameError`` naming the peer
and the field; nothing else can escape the decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgpack
import torch

from .errors import FrameError

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "FORMAT_VERSION",
    "FrameError",
    "Header",
    "decode_header",
    "encode_header",
]

#: Version of the header format; a receiver rejects any other.
FORMAT_VERSION = 1

#: The dtypes that may travel, by the name the header carries.
DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

#: Largest header frame accepted, in bytes (a real one is about 70).
MAX_HEADER_BYTES = 256
#: Most dimensions a shape may have.
MAX_NDIM = 16
#: Tags and sequence numbers live in [0, 2**63).
_MAX_INT = 2**63 - 1

_KEYS = frozenset({"v", "src", "dst", "tag", "seq", "dtype", "shape", "nbytes"})


@dataclass(frozen=True)
class Header:
    """A validated header. ``nbytes`` equals ``prod(shape) * dtype itemsize``."""

    src: int
    dst: int
    tag: int
    seq: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def encode_header(header: Header) -> bytes:
    """The msgpack bytes of ``header`` (frame 1 of a message)."""
    return msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "src": header.src,
            "dst": header.dst,
            "tag": header.tag,
            "seq": header.seq,
            "dtype": DTYPE_NAMES[header.dtype],
            "shape": list(header.shape),
            "nbytes": header.nbytes,
        },
        use_bin_type=True,
    )


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def decode_header(data: bytes, *, rank: int, world_size: int, peer: int) -> Header:
    """Decode and validate frame 1 of a message that ``peer``'s socket delivered to ``rank``.

    Checks everything that does not depend on the posted receive: the format,
    the version, that ``src`` is ``peer`` and ``dst`` is ``rank``, ranges, the
    dtype allowlist, and that ``nbytes`` is what dtype and shape imply.

    Raises:
        FrameError: naming ``peer`` and the offending field; never anything else.
    """

    def fail(field: str, detail: str) -> FrameError:
        return FrameError(rank, peer, field, detail)

    if len(data) > MAX_HEADER_BYTES:
        raise fail("header", f"{len(data)} bytes, more than the {MAX_HEADER_BYTES} allowed")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=64,
            max_bin_len=0,
            max_array_len=64,
            max_map_len=32,
            max_ext_len=0,
        )
    except Exception as exc:  # untrusted bytes: any decoder complaint is a bad frame
        raise fail("header", f"not a msgpack document ({type(exc).__name__}: {_show(str(exc))})") from None
    if not isinstance(obj, dict):
        raise fail("header", f"a msgpack {type(obj).__name__}, expected a map")
    if obj.keys() != _KEYS:
        missing, extra = sorted(_KEYS - obj.keys()), sorted(map(str, obj.keys() - _KEYS))
        raise fail("header", f"keys missing {missing}, unexpected {[_show(k) for k in extra]}")

    def integer(field: str, low: int, high: int) -> int:
        value = obj[field]
        if type(value) is not int:  # bool is an int subclass: refuse it too
            raise fail(field, f"expected an integer, got {_show(value)}")
        if not low <= value <= high:
            raise fail(field, f"{value} is outside [{low}, {high}]")
        return value

    version = obj["v"]
    if type(version) is not int or version != FORMAT_VERSION:
        raise fail("v", f"format version {_show(version)}, this rank speaks {FORMAT_VERSION}")
    src = integer("src", 0, world_size - 1)
    if src != peer:
        raise fail("src", f"header says src rank {src} but the socket identity is rank {peer}")
    dst = integer("dst", 0, world_size - 1)
    if dst != rank:
        raise fail("dst", f"addressed to rank {dst}, delivered to rank {rank}")
    tag = integer("tag", 0, _MAX_INT)
    seq = integer("seq", 0, _MAX_INT)
    name = obj["dtype"]
    if not isinstance(name, str) or name not in DTYPES:
        raise fail("dtype", f"{_show(name)} is not one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    shape = obj["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise fail("shape", f"expected a list of at most {MAX_NDIM} sizes, got {_show(shape)}")
    if not all(type(d) is int and 0 <= d <= _MAX_INT for d in shape):
        raise fail("shape", f"sizes must be integers >= 0, got {_show(shape)}")
    nbytes = integer("nbytes", 0, _MAX_INT)
    implied = math.prod(shape) * dtype.itemsize
    if nbytes != implied:
        raise fail("nbytes", f"{nbytes} bytes announced, but {name} of shape {_show(shape)} is {implied}")
    return Header(src, dst, tag, seq, dtype, tuple(shape), nbytes)
