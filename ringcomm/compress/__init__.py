"""Gradient compression: what crosses the wire made smaller (issue 24).

A compressor is **linear** or not, and that decides the collective:

- linear ones compose with every all-reduce algorithm: ``wire.py`` (bf16/fp16 on the wire, summed
  in the tensor's own dtype at every hop) and ``powersgd.py`` (low-rank P and Q, all-reduced);
- non-linear ones need all_gather: ``topk.py`` (values and indices gathered, summed locally).

Each module's docstring gives its bytes formula; ``cost.py`` holds them as functions.
"""

__all__ = ["COMPRESS_KINDS", "parse_compress"]

#: what ``launch.py --compress`` takes (a ``:`` argument where shown).
COMPRESS_KINDS = ("none", "bf16", "fp16", "powersgd:R", "topk:F")


def parse_compress(text: str) -> tuple[str, float | int | None]:
    """``--compress``'s value as (kind, argument): ``"powersgd:2"`` -> ("powersgd", 2); ValueError, one line.

    Imports nothing heavy (the command line checks it before torch loads).
    """
    kind, _, arg = str(text).partition(":")
    if kind in ("none", "bf16", "fp16") and not arg:
        return kind, None
    try:
        if kind == "powersgd" and arg:
            rank = int(arg)
            if rank >= 1:
                return kind, rank
        elif kind == "topk" and arg:
            fraction = float(arg)
            if 0 < fraction <= 1:
                return kind, fraction
    except ValueError:
        pass
    raise ValueError(
        f"--compress {text!r}: expected one of {', '.join(COMPRESS_KINDS)} (R an integer >= 1, 0 < F <= 1)"
    )
