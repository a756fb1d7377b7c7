"""What a command line needs to know about ringcomm, known without torch: names, labels, sizes.

The registries (``algorithms.ALGOS``, the transports of ``transport.py``) hold
functions that need torch; their *names* live here, once, so that
``launch.py``, ``python -m ringcomm.bench``, ``python -m ringcomm.demo`` and
the analysis can offer and parse them in a few milliseconds::

    ALGO_NAMES       ring, ring_simple, ps, naive, rhd, rd, hier, auto  (algorithms.ALGOS, same order)
    TRANSPORT_NAMES  shm, torch, zmq                               (transport.transport_names())
    AlgoSpec.parse("ps:2@zmq")  ->  AlgoSpec("ps:2@zmq", "ps", "zmq", shards=2)

The registries are built from these names and refuse any other (``algorithms.py``
checks its specs against ``ALGO_NAMES``; ``transport.register_transport`` refuses
a name not in ``TRANSPORT_NAMES``), so adding an algorithm or a transport starts
here and nothing can drift. This module imports nothing but the standard library.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ALGO_NAMES",
    "AlgoSpec",
    "COLLECTIVE_ALGO_NAMES",
    "DTYPE_BYTES",
    "DTYPE_NAMES",
    "OP_NAMES",
    "TRANSPORT_MODULES",
    "TRANSPORT_NAMES",
    "parse_size",
]

#: ``all_reduce(algo=...)``'s names, in the order ``--help`` lists them (``algorithms.ALGOS``'s keys).
ALGO_NAMES: tuple[str, ...] = ("ring", "ring_simple", "ps", "naive", "rhd", "rd", "hier", "auto")

#: Every collective's ``algo=`` names (``all_reduce``: ``ALGO_NAMES``; the others:
#: ``algorithms.collectives.COLLECTIVE_ALGOS``'s keys, same order), for ``--collective`` of the tools.
COLLECTIVE_ALGO_NAMES: dict[str, tuple[str, ...]] = {
    "all_reduce": ALGO_NAMES,
    "reduce_scatter": ("ring", "rhd", "auto"),
    "all_gather": ("ring", "rd", "auto"),
    "broadcast": ("ring", "tree", "auto"),
}

#: The built-in transports and the module that registers each (``transport.register_transport``);
#: ``transport.transport_names()`` is ``TRANSPORT_NAMES`` once they are imported.
TRANSPORT_MODULES: dict[str, str] = {
    "shm": "ringcomm.transports.shm",
    "torch": "ringcomm.transports.torch",
    "zmq": "ringcomm.transports.zmq",
}
TRANSPORT_NAMES: tuple[str, ...] = tuple(TRANSPORT_MODULES)

#: The reductions (``ops.OPS``).
OP_NAMES: tuple[str, ...] = ("sum", "avg", "max", "min")

#: The element types the bench times (``torch.<name>``).
DTYPE_NAMES: tuple[str, ...] = ("bfloat16", "float16", "float32", "float64")

#: Bytes per element of each ``DTYPE_NAMES`` type (``torch.<name>.itemsize``), for checks made before torch is imported.
DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}




def parse_size(text: str) -> int:
    """``"64K"`` -> 65536, ``"1M"`` -> 1048576, ``"3G"``, or plain bytes. Powers of 1024."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    number = text[:-1] if scale != 1 else text
    return int(float(number) * scale)


@dataclass(frozen=True)
class AlgoSpec:
    """One ``bench --algos`` entry, which is also the ``algo`` label of the rows it produces, in parts.

    Grammar: ``NAME[+overlap][:K][@TRANSPORT]``. NAME is ``gloo`` (``dist.all_reduce``) or a
    ``ringcomm.ALGOS`` name; ``+overlap`` is the parameter server's overlapped form
    (``ps_overlap=True``); ``:K`` shards the parameter server K ways (``ps`` only);
    ``@TRANSPORT`` picks the transport of this entry, else the default applies. A row's
    label names a transport other than torch, so ``ring`` run with ``--transport zmq``
    is labelled ``ring@zmq``. This is the one parser of the grammar: the bench and
    ``analysis`` (``fit``, ``results``, ``tables``) read row labels with it.

    Attributes:
        label: the row label (``ps:2``, ``ring@zmq``, ``gloo``).
        algo: ``"gloo"`` or a ringcomm algorithm name.
        transport: the transport the entry runs over (``torch`` for gloo).
        shards: K of ``ps:K``; None when not given (ringcomm's default, one shard).
        overlap: ``ps+overlap``: the parameter server streams its pulls while pushes arrive.
    """

    label: str
    algo: str
    transport: str
    shards: int | None = None
    overlap: bool = False

    @property
    def options(self) -> dict:
        """Keyword arguments for ``ringcomm.all_reduce`` beyond ``algo`` and ``transport``."""
        options: dict = {} if self.shards is None else {"ps_shards": self.shards}
        if self.overlap:
            options["ps_overlap"] = True
        return options

    @staticmethod
    def parse(text: str, default_transport: str = "torch") -> AlgoSpec:
        """Split ``text`` (``ps:2@zmq``); ``default_transport`` applies when there is no ``@``.

        Raises:
            ValueError: an empty name or transport, ``:K`` on anything but ``ps`` or with
                K not a whole number >= 1, or gloo on a transport other than torch.
        """
        name, at, transport = text.partition("@")
        name, colon, shards = name.partition(":")
        name, plus, modifier = name.partition("+")
        if not name or (at and not transport):
            raise ValueError(
                f"algorithm {text!r}: expected NAME[+overlap][:K][@TRANSPORT], e.g. ring, ps:2, ps+overlap, ring@zmq"
            )
        if plus and (name != "ps" or modifier != "overlap"):
            raise ValueError(
                f"algorithm {text!r}: the one modifier is ps+overlap (the overlapped parameter server)"
            )
        if colon and (name != "ps" or not shards.isdigit() or int(shards) < 1):
            raise ValueError(f"algorithm {text!r}: ':K' shards the parameter server, as in ps:2 (K >= 1)")
        if name == "gloo":
            if transport not in ("", "torch"):
                raise ValueError(f"algorithm {text!r}: gloo is torch.distributed's own; it has no transport")
            return AlgoSpec("gloo", "gloo", "torch")
        transport = transport or default_transport
        label = text if at or transport == "torch" else f"{text}@{transport}"
        return AlgoSpec(label, name, transport, int(shards) if colon else None, bool(plus))
