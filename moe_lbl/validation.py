"""Checks of user input shared by the engine, the demo, the corpus and the benchmarks.

Each error names what is wrong and what would be right.
"""

from __future__ import annotations

import os


def check_known(kind: str, given, choices) -> None:
    """Raise ValueError unless `given` (one value, or a list or tuple of values) is among `choices`.

    kind names the value in the message: "scope" for one value, "domains" for a list.
    """
    many = isinstance(given, (list, tuple))
    unknown = [v for v in given if v not in choices] if many else [given] if given not in choices else []
    if unknown:
        shown = unknown if many else repr(given)
        raise ValueError(f"unknown {kind} {shown}: choose from {', '.join(str(c) for c in choices)}")


def check_options(options, positive: tuple, ranks: int) -> None:
    """Run options: the fields named in `positive` are >= 1, and `ranks` fit the machine (one GPU
    per rank where CUDA is available, else one core per rank)."""
    import torch

    for name in positive:
        if getattr(options, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(options, name)}")
    cuda = torch.cuda.is_available()
    available = torch.cuda.device_count() if cuda else (os.cpu_count() or 1)
    if ranks > available:
        raise ValueError(f"ranks ({ranks}) must not exceed this machine's {available} {'GPUs' if cuda else 'cores'}")


def check_topk(topk: int, num_experts: int) -> None:
    """Each token chooses topk of num_experts experts."""
    if topk > num_experts:
        raise ValueError(f"topk ({topk}) must not exceed num_experts ({num_experts})")
