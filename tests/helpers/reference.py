"""A float64 reference of the balancing loss, written from the method's formulas for the tests.

It shares no code with the engine: f and P are computed from all ranks' data at once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from moe_lbl.engine import BalanceConfig, Report


def random_micro_batch(num_tokens: int, num_experts: int, num_padding: int, seed: int):
    """Logits [T, E] and a padding mask [T] (True = padding) with `num_padding` random positions."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    padding = torch.zeros(num_tokens, dtype=torch.bool)
    padding[torch.randperm(num_tokens, generator=g)[:num_padding]] = True
    return logits, padding


def topk_mask(logits: torch.Tensor, topk: int, padding: torch.Tensor) -> torch.Tensor:
    """Top-k of the fp32 softmax scores (as the router selects them), padding rows cleared."""
    scores = torch.softmax(logits.float(), dim=-1)
    index = torch.topk(scores, topk, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, index, True) & ~padding.unsqueeze(1)


class MicroBatchResult(NamedTuple):
    """What one micro-batch gives on one rank: the logits gradient and each term's value, by scope."""

    grad: torch.Tensor
    values: dict


def reference_losses(data: dict, config: BalanceConfig, num_experts: int, topk: int,
                     loss_scale: float = 1.0, tensor_parallel: int = 1) -> dict:
    """Per (rank, micro-batch): the float64 logits gradient and this rank's share of each term's
    value, by scope.

    data[(rank, j)] = (logits [T, E], padding [T]); ranks r and r' split the same sequences when
    r // tensor_parallel == r' // tensor_parallel (Megatron orders tensor-parallel ranks first).
    """
    masks = {key: topk_mask(logits, topk, padding) for key, (logits, padding) in data.items()}
    counts = {key: m.sum(0).double() for key, m in masks.items()}
    tokens = {key: float((~padding).sum()) for key, (_, padding) in data.items()}
    ranks = sorted({r for r, _ in data})
    out = {}
    for (r, j), (logits, padding) in data.items():
        sequence = [(q, j) for q in ranks if q // tensor_parallel == r // tensor_parallel]
        window = range(j + 1) if config.buffer else [j]
        batch = [(q, i) for q in ranks for i in window]
        sequence_tokens = max(sum(tokens[k] for k in sequence), 1.0)
        f = {
            "micro": sum(counts[k] for k in sequence) / (topk * sequence_tokens),
            "global": sum(counts[k] for k in batch) / (topk * max(sum(tokens[k] for k in batch), 1.0)),
        }
        coeffs = ({"micro": config.coeff} if config.scope == "micro"
                  else {"global": config.coeff, "micro": config.micro_coeff})
        x = logits.double().requires_grad_()
        P = torch.softmax(x, dim=-1)[~padding].sum(0) / sequence_tokens  # this rank's share
        values = {scope: num_experts * (f[scope] * P).sum() for scope, c in coeffs.items() if c > 0}
        loss = sum((coeffs[scope] * v for scope, v in values.items()), torch.zeros((), dtype=torch.float64))
        (loss * loss_scale).backward()
        out[r, j] = MicroBatchResult(x.grad, {scope: float(v) for scope, v in values.items()})
    return out


class ValueRecorder:
    """An engine Report whose targets read back as each term's value (its loss over its
    coefficient, as Megatron logs it), by scope."""

    def __init__(self, config: BalanceConfig):
        self.targets = {term.scope: torch.zeros(1, dtype=torch.float64) for term in config.terms()}
        self.report = Report(self.targets)

    def values(self) -> dict:
        return {scope: float(target) for scope, target in self.targets.items()}


def assert_matches_reference(got: dict, want: dict) -> None:
    """got[(rank, j)], a MicroBatchResult of what ran, against reference_losses' output."""
    assert got.keys() == want.keys()
    for key, result in got.items():
        expected = want[key]
        torch.testing.assert_close(result.grad.double(), expected.grad, rtol=1e-5, atol=1e-8,
                                   msg=lambda m, key=key: f"{key}: {m}")
        assert result.values.keys() == expected.values.keys(), key
        for scope, value in expected.values.items():
            assert abs(result.values[scope] - value) <= 1e-6 * abs(value), (key, scope, result.values[scope], value)
