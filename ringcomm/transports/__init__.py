"""Transports: how bytes move between two ranks.

``base.py`` holds the protocol every transport offers (post messages, wait for them) and the registry;
``torch.py`` (Gloo/NCCL point-to-point), ``zmq.py`` (ZeroMQ, with ``wire.py``'s header codec) and
``shm.py`` (shared memory, with ``segments.py``'s segments and doorbells) implement it. Nothing is imported here, so a torch-free command may import ``wire`` or ``segments``.
"""
