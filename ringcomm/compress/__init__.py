"""Gradient compression: what crosses the wire made smaller (issue 24).

A compressor is **linear** or not, and that decides the collective:

- linear ones compose with every all-reduce algorithm: ``wire.py`` (bf16/fp16 on the wire, summed
  in the tensor's own dtype at every hop) and ``powersgd.py`` (low-rank P and Q, all-reduced);
- non-linear ones need all_gather: ``topk.py`` (values and indices gathered, summed locally).

Each module's docstring gives its bytes formula; ``cost.py`` holds them as functions.
"""
