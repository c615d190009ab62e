"""The demo app, apart from the library: `moe-lbl demo` (compare.py) trains a tiny Megatron-Core
GPT-MoE (tiny_gpt.py, which the benchmarks and the tests train too) on a mixed-domain corpus
(corpus.py), once per balancing scope, and compares them."""
