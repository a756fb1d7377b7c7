r"""The wire format of one message: what a receiver checks before it writes a byte.

Used by every transport that carries its own headers: ZeroMQ (``zmq.py``) speaks this
format; the shared-memory transport (``shm.py``) has a fixed binary header of its own (a slot's
first 64 bytes) but takes its dtype codes from the same table, ``DTYPE_TABLE``. One message
is a ZeroMQ multipart message of three or more frames::

    frame 0: preamble, exactly 20 bytes: this world's token (16 random bytes) | src rank (uint32, big-endian)
    frame 1: header, a msgpack map of eight fields, about 70 bytes:
             {"v": 2, "src": 2, "dst": 3, "tag": 0, "seq": 17,
              "dtype": "float32", "shape": [262144], "nbytes": 1048576}
    frame 2..: body, the tensor's raw bytes cut into pieces of BODY_FRAME_BYTES (the last one
             shorter; one empty piece for an empty tensor): body_frames(nbytes) frames

**The token** is minted by one rank for each transport set-up and shared through
the store (``zmq_transport.py``), so only processes of this world know it. A
frame 0 that is not exactly this world's preamble (``read_preamble``) marks the
message as foreign: a stray client, or a zombie of an earlier job on a reused
port. The receiver drops it unread; it is not the job's failure.

**The size cap.** No legitimate frame is longer than ``MAX_FRAME_BYTES``: a
preamble is 20 bytes, a header at most ``MAX_HEADER_BYTES``, and the sender
cuts every body into pieces of at most ``BODY_FRAME_BYTES``. So a receiver can
tell libzmq to refuse longer frames (``ZMQ_MAXMSGSIZE``), which it checks on the
length prefix, before it allocates anything: nobody can make it allocate a
multi-GB frame by announcing one.

``seq`` counts messages per (source, destination, tag) from 0, so a lost,
duplicated or replayed message is caught, not silently reduced twice.

**Validation.** Nothing is ever unpickled. A header is decoded with msgpack
(``raw=False``, ``strict_map_key=True``, no ext types, small limits) and must be
a map with exactly the expected keys and types. A wrong version, ``src``
differing from the preamble's, ``dst`` not this rank, a dtype outside
``DTYPES``, or a shape/nbytes that disagree raise ``FrameError`` naming the peer
and the field; nothing else can escape the decoder. (A message that carries the
token comes from a rank of this world, so a malformed one is a bug worth an
error, not noise to drop.)
"""

from __future__ import annotations

import hmac
import math
import secrets
import struct
from dataclasses import dataclass

import msgpack
import torch

from ..errors import FrameError

__all__ = [
    "BODY_FRAME_BYTES",
    "CODE_DTYPES",
    "DTYPES",
    "DTYPE_CODES",
    "DTYPE_NAMES",
    "DTYPE_TABLE",
    "FORMAT_VERSION",
    "FrameError",
    "Header",
    "MAX_FRAME_BYTES",
    "MAX_HEADER_BYTES",
    "PREAMBLE_BYTES",
    "TOKEN_BYTES",
    "body_frames",
    "body_pieces",
    "decode_header",
    "encode_header",
    "encode_preamble",
    "new_token",
    "read_preamble",
]

#: Version of the header format; a receiver rejects any other. 2: the preamble frame and cut bodies.
FORMAT_VERSION = 2

#: Every dtype that may travel, in one table: its code (the number a shared-memory header carries,
#: ``shm.py``), its name (what a ZeroMQ header carries) and the torch dtype. A code is part of the
#: format, fixed here and never derived from the table's order: a new dtype takes a number no row
#: has used, and no row is ever renumbered (``tests/test_shm_transport.py`` pins them).
DTYPE_TABLE: tuple[tuple[int, str, torch.dtype], ...] = (
    (0, "float16", torch.float16),
    (1, "bfloat16", torch.bfloat16),
    (2, "float32", torch.float32),
    (3, "float64", torch.float64),
    (4, "int32", torch.int32),
    (5, "int64", torch.int64),
    (6, "uint8", torch.uint8),
)
#: The table by name (what a ZeroMQ header may name), by dtype, and by code.
DTYPES: dict[str, torch.dtype] = {name: dtype for _, name, dtype in DTYPE_TABLE}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for _, name, dtype in DTYPE_TABLE}
DTYPE_CODES: dict[torch.dtype, int] = {dtype: code for code, _, dtype in DTYPE_TABLE}
CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for code, _, dtype in DTYPE_TABLE}

#: Largest header frame accepted, in bytes (a real one is about 70).
MAX_HEADER_BYTES = 256
#: Random bytes of a world's token.
TOKEN_BYTES = 16
_PREAMBLE = struct.Struct(f">{TOKEN_BYTES}sI")
#: Length of frame 0: the token, then the sender's rank as a big-endian uint32.
PREAMBLE_BYTES = _PREAMBLE.size
#: Longest piece of a body, in bytes. 16 MiB: a 1 GiB tensor travels in 64 frames (a few
#: microseconds of overhead each), and a foreign frame costs the receiver at most this much.
BODY_FRAME_BYTES = 16 * 1024 * 1024
#: Longest frame a rank of this world ever sends, in bytes: the receiver's ZMQ_MAXMSGSIZE.
MAX_FRAME_BYTES = max(PREAMBLE_BYTES, MAX_HEADER_BYTES, BODY_FRAME_BYTES)
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


def new_token() -> bytes:
    """A fresh random token (``TOKEN_BYTES`` bytes from the OS's CSPRNG)."""
    return secrets.token_bytes(TOKEN_BYTES)


def encode_preamble(token: bytes, src: int) -> bytes:
    """Frame 0 of every message ``src`` sends in the world of ``token``."""
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"a token is {TOKEN_BYTES} bytes, got {len(token)}")
    return _PREAMBLE.pack(token, src)


def read_preamble(frame: bytes, token: bytes) -> int | None:
    """The sender's rank that ``frame`` (frame 0 of a message) names, or None when it is not
    exactly a preamble carrying ``token``: a foreign message, to drop unread.

    The rank is not range-checked here. The token is compared in constant time, so a
    stranger cannot learn it a byte at a time from how fast its guesses are refused.
    """
    if len(frame) != PREAMBLE_BYTES:
        return None
    carried, src = _PREAMBLE.unpack(frame)
    return src if hmac.compare_digest(carried, token) else None


def body_frames(nbytes: int) -> int:
    """How many frames a body of ``nbytes`` bytes travels in (at least one, empty for 0 bytes)."""
    return max(1, -(-nbytes // BODY_FRAME_BYTES))


def body_pieces(body: memoryview) -> list[memoryview]:
    """``body`` (bytes, one-dimensional) cut into the ``body_frames(len(body))`` pieces it travels in;
    views, not copies."""
    if len(body) == 0:
        return [body]
    return [body[i : i + BODY_FRAME_BYTES] for i in range(0, len(body), BODY_FRAME_BYTES)]


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
    the version, that ``src`` is ``peer`` (the rank the preamble named) and ``dst`` is ``rank``, ranges, the
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
        raise fail("src", f"header says src rank {src} but the preamble says rank {peer}")
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
