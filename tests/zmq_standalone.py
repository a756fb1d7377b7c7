"""A ZmqTransport without torch.distributed, for the tests: it binds at once, and peers are given by hand.

The library makes its transports through the session's rendezvous (``ZmqTransport(setup)``);
the frame tests need one transport in this process and a raw pyzmq socket as its peer, or two
transports side by side, with no store. This is that door, kept out of the library.
"""

from __future__ import annotations

from ringcomm.transports.wire import TOKEN_BYTES, new_token
from ringcomm.transports.zmq import ZmqTransport


def standalone(
    rank: int, world_size: int, *, bind: str = "tcp://127.0.0.1", token: bytes | None = None
) -> ZmqTransport:
    """A transport that binds now; give it its peers with ``set_peers``.

    ``bind`` is ``tcp://<address>`` (a kernel-chosen port is added) or ``ipc://`` (a private
    temporary path). ``token``: the world's (``TOKEN_BYTES`` bytes); by default a new one, which
    the other ranks then take from ``.token``. ``.endpoint`` is the address peers connect to.
    """
    if token is None:
        token = new_token()
    elif len(token) != TOKEN_BYTES:
        raise ValueError(f"token must be {TOKEN_BYTES} bytes, got {len(token)}")
    transport = ZmqTransport.__new__(ZmqTransport)
    transport._open(rank, world_size, token)
    try:
        transport._bind(bind)
    except BaseException:
        transport.close()
        raise
    return transport
