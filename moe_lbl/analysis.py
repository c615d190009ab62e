"""Expert specialization: per-domain expert selection, as in Qiu et al. (arXiv 2501.11873, Fig. 1b).

A RoutingRecorder accumulates, per domain and MoE layer, how often each expert is among a token's
top-k choices and the sum of the chosen experts' scores. From those:
- selection frequency f[d][l][i]: the fraction of domain d's tokens that choose expert i in layer
  l (each token chooses k experts, so a layer's frequencies sum to k; uniform is k / N_E). The
  paper reports maxima above 0.2 under global balance and below 0.15 under micro balance at
  64 experts, top-4;
- mean summed top-k score: the average over tokens of the chosen experts' scores (softmax over
  all experts), which rises when routing is more confident;
- domain divergence: the Jensen-Shannon divergence between two domains' expert distributions
  (frequencies / k), averaged over domain pairs and layers; 0 when all domains route alike.
The recorder itself is framework-agnostic; `record_routing` feeds it from the routers of any
Megatron-Core MoE model, patched or not, through forward hooks.
"""

from __future__ import annotations

import contextlib
import itertools
import json
from typing import Optional

import torch

from moe_lbl.scores import balancing_scores
from moe_lbl.tables import format_table


class RoutingRecorder:
    def __init__(self):
        self.domain: Optional[str] = None  # set before each evaluation batch
        self.counts: dict = {}  # (domain, layer) -> int64 [N_E]
        self.tokens: dict = {}  # (domain, layer) -> int
        self.score_sums: dict = {}  # (domain, layer) -> float, summed over tokens

    def observe(self, layer: int, scores: torch.Tensor, routing_map: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> None:
        """One batch of one layer: scores [T, N_E] over all experts, routing_map [T, N_E] bool."""
        if self.domain is None:
            raise RuntimeError("set recorder.domain before each batch: the recorder tags counts by domain")
        if valid is not None:
            scores, routing_map = scores[valid], routing_map[valid]
        key = (self.domain, layer)
        counts = routing_map.sum(dim=0, dtype=torch.int64).cpu()
        self.counts[key] = self.counts.get(key, torch.zeros_like(counts)) + counts
        self.tokens[key] = self.tokens.get(key, 0) + routing_map.shape[0]
        chosen = torch.where(routing_map, scores.float(), torch.zeros((), device=scores.device)).sum()
        self.score_sums[key] = self.score_sums.get(key, 0.0) + float(chosen)

    def save(self, path: str) -> None:
        """Write the recorded counts as JSON (moe-lbl analyze reads it)."""
        entries = [{"domain": d, "layer": layer, "counts": self.counts[d, layer].tolist(),
                    "tokens": self.tokens[d, layer], "score_sum": self.score_sums[d, layer]}
                   for d, layer in sorted(self.counts)]
        with open(path, "w") as f:
            json.dump({"format": "moe-lbl routing record", "version": 1, "entries": entries}, f)

    @classmethod
    def load(cls, path: str) -> "RoutingRecorder":
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != "moe-lbl routing record":
            raise ValueError(f"{path} is not a moe-lbl routing record (written by RoutingRecorder.save)")
        entries = data.get("entries")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path} holds no routing entries (record a routing with record_routing first)")
        recorder = cls()
        experts = None
        for number, entry in enumerate(entries):
            where = f"{path}: entry {number}"
            if not isinstance(entry, dict) or not {"domain", "layer", "counts", "tokens", "score_sum"} <= set(entry):
                raise ValueError(f"{where} must have domain, layer, counts, tokens and score_sum")
            counts = entry["counts"]
            if not (isinstance(counts, list) and counts and all(type(c) is int and c >= 0 for c in counts)):
                raise ValueError(f"{where}: counts must be a non-empty list of integers >= 0, got {counts!r:.60}")
            if experts is not None and len(counts) != experts:
                raise ValueError(f"{where} counts {len(counts)} experts where earlier entries count {experts}")
            experts = len(counts)
            if type(entry["tokens"]) is not int or entry["tokens"] < 0 or not isinstance(entry["score_sum"],
                                                                                         (int, float)):
                raise ValueError(f"{where}: tokens must be an integer >= 0 and score_sum a number")
            key = (entry["domain"], entry["layer"])
            recorder.counts[key] = torch.tensor(counts, dtype=torch.int64)
            recorder.tokens[key] = entry["tokens"]
            recorder.score_sums[key] = float(entry["score_sum"])
        return recorder

    def report(self) -> str:
        """The specialization metrics as text."""
        maxima, scores = self.max_frequency(), self.mean_topk_score()
        rows = [{"domain": d, "max frequency": f"{maxima[d]:.4f}", "mean top-k score": f"{scores[d]:.4f}"}
                for d in self.domains]
        lines = [format_table(rows, ["domain", "max frequency", "mean top-k score"], rule=False)]
        lines.append("domain divergence (Jensen-Shannon, nats, mean over pairs and layers): "
                     f"{self.domain_divergence():.4f}")
        return "\n".join(lines)

    @property
    def domains(self) -> list:
        return sorted({d for d, _ in self.counts})

    @property
    def layers(self) -> list:
        return sorted({layer for _, layer in self.counts})

    def selection_frequency(self) -> dict:
        """{domain: {layer: float64 [N_E]}}, each the fraction of the domain's tokens choosing expert i."""
        return {d: {layer: self.counts[d, layer].double() / max(self.tokens[d, layer], 1)
                    for layer in self.layers if (d, layer) in self.counts} for d in self.domains}

    def max_frequency(self) -> dict:
        """{domain: the highest selection frequency of any expert in any layer}."""
        return {d: max(float(f.max()) for f in layers.values()) for d, layers in self.selection_frequency().items()}

    def mean_topk_score(self) -> dict:
        """{domain: mean over layers and tokens of the chosen experts' summed scores}."""
        return {d: sum(self.score_sums[d, layer] / max(self.tokens[d, layer], 1) for layer in self.layers)
                / len(self.layers) for d in self.domains}

    def domain_divergence(self) -> float:
        """Jensen-Shannon divergence (nats) of the domains' expert distributions, averaged."""
        frequency = self.selection_frequency()
        values = []
        for layer in self.layers:
            for a, b in itertools.combinations(self.domains, 2):
                if layer in frequency[a] and layer in frequency[b]:
                    values.append(jensen_shannon(frequency[a][layer], frequency[b][layer]))
        return sum(values) / len(values) if values else 0.0


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = p.double() / p.sum(), q.double() / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return float((a[mask] * (a[mask] / b[mask]).log()).sum())

    return (kl(p, m) + kl(q, m)) / 2


@contextlib.contextmanager
def record_routing(model, recorder: Optional[RoutingRecorder] = None):
    """Record every TopKRouter's expert choices, tagged by `recorder.domain`, while in the block.

    Works on any Megatron-Core MoE model, patched or not. Meant for evaluation: each router's
    scores are recomputed from its input (softmax over all experts, or normalized sigmoid), so
    the summed top-k score can be measured whatever the routing options.
    """
    from megatron.core.transformer.moe.router import TopKRouter

    recorder = RoutingRecorder() if recorder is None else recorder
    chunks = model if isinstance(model, (list, tuple)) else [model]

    def hook(router, args, kwargs, output):
        with torch.no_grad():
            logits = router.gating(args[0]).view(-1, router.config.num_moe_experts).float()
            scores = balancing_scores(logits, router.score_function)
            padding = kwargs.get("padding_mask", args[1] if len(args) > 1 else None)
            valid = None if padding is None else ~padding.reshape(-1)
            recorder.observe(router.layer_number, scores, output[1], valid)

    handles = [module.register_forward_hook(hook, with_kwargs=True)
               for chunk in chunks for module in chunk.modules() if isinstance(module, TopKRouter)]
    if not handles:
        raise ValueError("the model has no Megatron-Core TopKRouter to record")
    try:
        yield recorder
    finally:
        for handle in handles:
            handle.remove()
