"""The algorithms, one a file, each beside its diagram and cost.

``ring.py`` (scatter-reduce then all-gather: the readable one) and ``ring_pipelined.py`` beside it;
``rhd.py`` (recursive halving + doubling) and ``rd.py`` (recursive doubling), with ``fold.py`` for any P;
``ps.py`` (parameter server: central, sharded, overlapped); ``naive.py`` (everything through rank 0).
``registry.py`` holds the contract they share and the registry ``all_reduce`` picks from; ``chunks.py``
(how a tensor splits), ``buffers.py`` (scratch space) and ``tags.py`` (one tag per kind of message) serve
them all. Nothing is imported here: ``chunks`` stays importable without torch (the cost model counts with it).
"""
