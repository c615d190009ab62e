"""A mixed-domain byte-level corpus built from what every Python installation carries.

Domains, each clearly different in its statistics:
- code:       the standard library's .py sources
- english:    the English reference prose of pydoc_data.topics
- arithmetic: generated sums and products of multi-digit numbers, with their answers
- data:       JSON records of the Unicode database (code point, name, category, ...)

Every training sequence comes from one domain. Sequences are fixed windows of seq_length + 1
bytes over each domain's text; the split into train and validation is a seeded shuffle, so the
same arguments always give the same corpus.
"""

from __future__ import annotations

import json
import os
import random
import sysconfig
import unicodedata
from dataclasses import dataclass

import torch

from moe_lbl.validation import check_known

DOMAINS = ("code", "english", "arithmetic", "data")
VOCAB_SIZE = 256  # bytes


def _code(limit: int) -> bytes:
    stdlib = sysconfig.get_paths()["stdlib"]
    chunks, size = [], 0
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "idlelib", "__pycache__"))
        for name in sorted(files):
            if name.endswith(".py") and size < limit:
                with open(os.path.join(root, name), "rb") as f:
                    chunks.append(f.read())
                size += len(chunks[-1])
    return b"\n".join(chunks)


def _english(limit: int) -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")[:limit]


def _arithmetic(limit: int, seed: int) -> bytes:
    rng = random.Random(seed)
    lines, size = [], 0
    while size < limit:
        a, b = rng.randrange(10, 10 ** rng.randint(2, 6)), rng.randrange(10, 10 ** rng.randint(2, 4))
        line = f"{a}+{b}={a + b}\n" if rng.random() < 0.5 else f"{a}*{b}={a * b}\n"
        lines.append(line)
        size += len(line)
    return "".join(lines).encode("ascii")


def _data(limit: int) -> bytes:
    records, size = [], 0
    for code_point in range(0x20, 0x110000):
        name = unicodedata.name(chr(code_point), None)
        if name is None:
            continue
        record = json.dumps({"cp": f"U+{code_point:04X}", "name": name,
                             "category": unicodedata.category(chr(code_point)),
                             "bidi": unicodedata.bidirectional(chr(code_point)),
                             "mirrored": unicodedata.mirrored(chr(code_point))}) + "\n"
        records.append(record)
        size += len(record)
        if size >= limit:
            break
    return "".join(records).encode("utf-8")


@dataclass(frozen=True)
class Corpus:
    """Per domain, int64 token windows [N, seq_length + 1] for training and validation."""

    train: dict
    val: dict
    seq_length: int

    def batches(self, split: str, domain: str, batch_size: int, generator: torch.Generator):
        """Random batches (inputs [b, s], targets [b, s]) of one domain, drawn with `generator`."""
        windows = getattr(self, split)[domain]
        index = torch.randint(0, windows.shape[0], (batch_size,), generator=generator)
        chosen = windows[index]
        return chosen[:, :-1], chosen[:, 1:]


def build_corpus(seq_length: int = 64, sequences_per_domain: int = 2000, val_fraction: float = 0.1,
                 seed: int = 0, domains: tuple = DOMAINS) -> Corpus:
    """The corpus: `sequences_per_domain` windows per domain (fewer if a text runs out)."""
    check_known("domains", domains, DOMAINS)
    if not domains:
        raise ValueError("at least one domain is needed")
    if seq_length < 1 or sequences_per_domain < 2:
        raise ValueError("seq_length must be >= 1 and sequences_per_domain >= 2, "
                         f"got {seq_length}, {sequences_per_domain}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    window = seq_length + 1
    limit = window * sequences_per_domain
    sources = {"code": lambda: _code(limit), "english": lambda: _english(limit),
               "arithmetic": lambda: _arithmetic(limit, seed), "data": lambda: _data(limit)}
    train, val = {}, {}
    for position, domain in enumerate(domains):
        text = torch.frombuffer(bytearray(sources[domain]()[:limit]), dtype=torch.uint8).to(torch.int64)
        windows = text[: (text.numel() // window) * window].view(-1, window)
        order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed * 1009 + position))
        num_val = max(1, int(round(windows.shape[0] * val_fraction)))
        val[domain], train[domain] = windows[order[:num_val]], windows[order[num_val:]]
    return Corpus(train=train, val=val, seq_length=seq_length)
