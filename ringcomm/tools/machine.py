"""What the figures were measured on: one description of the machine, known without importing torch.

Written by ``python -m ringcomm.bench --json``, its ``--tune`` file, ``analysis.sweep``
(``sweep.json``) and the trainer (``metrics.json``). It lives apart from the bench so
that training does not import the bench, and the sweep does not import torch.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import platform
import sys
from pathlib import Path

__all__ = ["machine_info", "torch_version"]


def torch_version() -> str:
    """``torch.__version__`` (``2.5.1+cpu``), read without importing torch when it is not imported yet.

    torch's import takes over a second; its ``torch/version.py`` holds the same string as a
    literal (the installed metadata would drop the ``+cpu`` local part).
    """
    torch = sys.modules.get("torch")
    if torch is None:
        spec = importlib.util.find_spec("torch")  # finds the package without running it
        for folder in (spec.submodule_search_locations or []) if spec else []:
            try:
                tree = ast.parse((Path(folder) / "version.py").read_text())
            except (OSError, SyntaxError):
                continue
            for node in tree.body:
                targets = node.targets if isinstance(node, ast.Assign) else []
                if any(getattr(t, "id", None) == "__version__" for t in targets) and isinstance(
                    node.value, ast.Constant
                ):
                    return str(node.value.value)
        import torch  # no readable version.py: ask the module itself
    return str(torch.__version__)


def machine_info() -> dict:
    """What the figures were measured on: CPU count, OS, Python and torch versions (and the cluster).

    ``platform.platform()`` and ``platform.processor()`` are avoided: they may run
    ``uname -p`` in a subprocess, which a parent of a live world should not fork.
    """
    info = {
        "cpus": os.cpu_count(),
        "platform": f"{platform.system()}-{platform.release()}-{platform.machine()}",
        "processor": platform.machine(),
        "python": platform.python_version(),
        "torch": torch_version(),
    }
    if os.environ.get("RINGCOMM_CLUSTER"):  # set by analysis.cluster in each node it runs
        info["cluster"] = os.environ["RINGCOMM_CLUSTER"]
    return info
