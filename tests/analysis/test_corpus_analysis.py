"""The mixed-domain corpus and the routing recorder's specialization metrics."""

import json
import math
import re

import pytest
import torch

import moe_lbl
from moe_lbl.analysis import RoutingRecorder, jensen_shannon
from moe_lbl.demo.corpus import DOMAINS, build_corpus


def text(windows):
    return bytes(windows[:50].flatten().tolist())


def test_corpus_is_deterministic_and_labelled():
    a = build_corpus(seq_length=32, sequences_per_domain=200, seed=3)
    b = build_corpus(seq_length=32, sequences_per_domain=200, seed=3)
    c = build_corpus(seq_length=32, sequences_per_domain=200, seed=4)
    assert set(a.train) == set(a.val) == set(DOMAINS)
    for domain in DOMAINS:
        assert torch.equal(a.train[domain], b.train[domain]) and torch.equal(a.val[domain], b.val[domain])
        assert a.train[domain].shape[1] == 33 and int(a.train[domain].max()) < 256
        assert a.train[domain].shape[0] + a.val[domain].shape[0] == 200
        assert a.val[domain].shape[0] == 20
    assert not torch.equal(a.val["code"], c.val["code"])  # the split follows the seed
    assert b"def " in text(a.train["code"]) and b"self" in text(a.train["code"])
    assert b" the " in text(a.train["english"])
    assert re.search(rb"\d+[+*]\d+=\d+\n", text(a.train["arithmetic"]))
    data = build_corpus(seq_length=400, sequences_per_domain=10, domains=("data",))
    line = bytes(data.train["data"][0].tolist()).split(b"\n")[1]  # a whole record inside one window
    assert json.loads(line)["cp"].startswith("U+")


def test_arithmetic_answers_are_right():
    corpus = build_corpus(seq_length=64, sequences_per_domain=50, domains=("arithmetic",))
    # Whole lines only: those between the first and last newline of each window.
    lines = [line for window in corpus.train["arithmetic"] for line in bytes(window.tolist()).split(b"\n")[1:-1]]
    checked = 0
    for line in lines:
        match = re.fullmatch(rb"(\d+)([+*])(\d+)=(\d+)", line)
        assert match, line
        a, op, b, answer = int(match[1]), match[2], int(match[3]), int(match[4])
        assert answer == (a + b if op == b"+" else a * b)
        checked += 1
    assert checked > 20


@pytest.mark.parametrize("kwargs,error", [
    (dict(domains=("code", "klingon")), "unknown domains"),
    (dict(domains=()), "at least one domain"),
    (dict(seq_length=0), "seq_length must be >= 1"),
    (dict(val_fraction=1.0), "val_fraction must be in"),
])
def test_corpus_rejects_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        build_corpus(**kwargs)


def test_specialization_metrics(tmp_path):
    recorder = RoutingRecorder()
    with pytest.raises(RuntimeError, match="set recorder.domain"):
        recorder.observe(1, torch.ones(2, 4), torch.ones(2, 4, dtype=torch.bool))
    scores = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.6, 0.3, 0.05, 0.05]])
    recorder.domain = "math"
    recorder.observe(1, scores, torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool))
    recorder.domain = "code"
    recorder.observe(1, scores, torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool),
                     valid=torch.tensor([True, False]))
    frequency = recorder.selection_frequency()
    assert torch.equal(frequency["math"][1], torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.equal(frequency["code"][1], torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64))
    assert recorder.max_frequency() == {"code": 1.0, "math": 1.0}
    assert recorder.mean_topk_score()["math"] == pytest.approx((0.9 + 0.9) / 2)
    assert recorder.mean_topk_score()["code"] == pytest.approx(0.1)
    assert recorder.domain_divergence() == pytest.approx(math.log(2))  # disjoint experts
    path = tmp_path / "record.json"
    recorder.save(str(path))
    loaded = RoutingRecorder.load(str(path))
    assert loaded.selection_frequency().keys() == frequency.keys()
    assert loaded.report() == recorder.report() and "domain divergence" in loaded.report()
    path.write_text("[]")
    with pytest.raises(ValueError, match="not a moe-lbl routing record"):
        RoutingRecorder.load(str(path))
    same = torch.tensor([0.5, 0.25, 0.25])
    assert jensen_shannon(same, same * 2) == pytest.approx(0.0)


def test_recorder_counts_match_the_routers_outputs(megatron_world):
    from megatron.core.transformer.moe.router import TopKRouter

    from moe_lbl.demo.tiny_gpt import TinyGPT, build_gpt, causal_mask

    corpus = build_corpus(seq_length=16, sequences_per_domain=20)
    spec = TinyGPT(vocab_size=256, seq_length=16)
    model, _ = build_gpt(spec)
    model.eval()
    maps = {}
    direct = [m.register_forward_hook(lambda m, a, o: maps.setdefault(m.layer_number, []).append(o[1]))
              for m in model.modules() if isinstance(m, TopKRouter)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), moe_lbl.record_routing(model) as recorder:
        for domain in ("code", "english"):
            recorder.domain = domain
            tokens, _ = corpus.batches("val", domain, 2, g)
            model(tokens, torch.arange(16).expand(2, 16), causal_mask(16))
    for handle in direct:
        handle.remove()
    for layer in (1, 2):
        assert torch.equal(recorder.counts["code", layer], maps[layer][0].sum(0))
        assert torch.equal(recorder.counts["english", layer], maps[layer][1].sum(0))
        assert recorder.tokens["code", layer] == 32
    frequency = recorder.selection_frequency()
    assert float(frequency["code"][1].sum()) == pytest.approx(spec.topk)
    assert 0 < recorder.mean_topk_score()["code"] <= 1
    assert not any(m._forward_hooks for m in model.modules() if isinstance(m, TopKRouter))  # removed
    with pytest.raises(ValueError, match="no Megatron-Core TopKRouter"):
        with moe_lbl.record_routing(torch.nn.Linear(2, 2)):
            pass
