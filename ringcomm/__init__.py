"""ringcomm: ring all-reduce and a parameter server, written to be read and measured.

    >>> import torch, torch.distributed as dist, ringcomm
    >>> dist.init_process_group("gloo")          # or torchrun / launch.py
    >>> t = torch.full((1000,), float(dist.get_rank()))
    >>> ringcomm.all_reduce(t, op="sum", algo="ring")   # in place; returns t

See ring.py (the diagram and cost model), param_server.py, naive.py, transport.py.
"""

from .api import ALGOS, all_reduce, init
from .errors import CommError, CommTimeoutError, MismatchError, PeerError
from .transport import DEFAULT_TIMEOUT_S, TorchTransport, Transport, get_transport

__all__ = [
    "ALGOS",
    "DEFAULT_TIMEOUT_S",
    "CommError",
    "CommTimeoutError",
    "MismatchError",
    "PeerError",
    "Transport",
    "TorchTransport",
    "all_reduce",
    "get_transport",
    "init",
]

__version__ = "0.1.0"
