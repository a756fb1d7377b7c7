"""ringcomm: ring all-reduce and a parameter server, written to be read and measured.

    >>> import torch, torch.distributed as dist, ringcomm
    >>> dist.init_process_group("gloo")          # or torchrun / launch.py
    >>> t = torch.full((1000,), float(dist.get_rank()))
    >>> ringcomm.all_reduce(t, op="sum", algo="ring")        # in place; returns t
    >>> fut = ringcomm.all_reduce_async(t, algo="ps")       # on ringcomm's comm thread
    >>> fut.wait()

Where things are: ring.py (the diagram), ring_pipelined.py, rhd.py, rd.py
(with fold.py), param_server.py, naive.py (the algorithms, registered in
algorithms.py; auto.py picks one per call); transport.py (the protocol every
transport offers; torch_transport.py, zmq_transport.py, shm_transport.py with
shm.py); cost.py (the cost model); session.py, comm_queue.py, fingerprint.py,
board.py, liveness.py (what runs around a collective).
"""

# The transport modules register themselves with the registry in transport.py on import.
from . import shm_transport, torch_transport, zmq_transport  # noqa: F401  (imported for registration)
from .algorithms import ALGOS
from .api import all_reduce, all_reduce_async, comm_stats, init
from .auto import explain as explain_auto
from .comm_queue import CommStats
from .errors import CommError, CommTimeoutError, FrameError, MismatchError, PeerError
from .session import shutdown
from .settings import DEFAULT_TIMEOUT_S
from .transport import Transport, transport_names

__all__ = [
    "ALGOS",
    "DEFAULT_TIMEOUT_S",
    "CommError",
    "CommStats",
    "CommTimeoutError",
    "FrameError",
    "MismatchError",
    "PeerError",
    "Transport",
    "all_reduce",
    "all_reduce_async",
    "comm_stats",
    "explain_auto",
    "init",
    "shutdown",
    "transport_names",
]

__version__ = "0.2.0.dev0"
