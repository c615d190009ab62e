"""The routing a fused router call performs, and how it is launched (the public module,
moe_lbl.kernels.topk_router, exports them)."""

from dataclasses import dataclass
from typing import Optional

import torch

MAX_EXPERTS = 2048
MAX_TOPK = 16
FUSED_SCORE_FUNCTIONS = ("softmax", "sigmoid")  # of moe_lbl.scores.SCORE_FUNCTIONS, those the kernels route
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class RoutingSpec:
    """The routing options of Megatron-Core's topk_routing_with_score_function."""

    num_experts: int
    topk: int
    score_function: str = "softmax"
    use_pre_softmax: bool = False
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    scaling_factor: Optional[float] = None

    def __post_init__(self):
        e, k = self.num_experts, self.topk
        if self.score_function not in FUSED_SCORE_FUNCTIONS:
            raise ValueError(f"score_function must be one of {FUSED_SCORE_FUNCTIONS}, got {self.score_function!r}")
        if not 1 <= e <= MAX_EXPERTS:
            raise ValueError(f"the fused router supports 1 to {MAX_EXPERTS} experts, got {e}")
        if not 1 <= k <= min(e, MAX_TOPK):
            raise ValueError(f"topk must be in [1, min(num_experts, {MAX_TOPK})] = [1, {min(e, MAX_TOPK)}], got {k}")
        if self.group_topk:
            g = self.num_groups
            if not g or e % g:
                raise ValueError(f"num_experts ({e}) must be divisible by num_groups ({g}) for group-limited top-k")
            if not 1 <= self.group_topk <= g:
                raise ValueError(f"group_topk must be in [1, num_groups={g}], got {self.group_topk}")
            per_group = k // self.group_topk
            if per_group < 1 or per_group > e // g or k > self.group_topk * (e // g):
                raise ValueError(
                    f"topk ({k}) must allow topk // group_topk >= 1 experts per chosen group and fit in "
                    f"group_topk ({self.group_topk}) groups of {e // g} experts")

    @property
    def grouped(self) -> bool:
        return bool(self.group_topk)


@dataclass(frozen=True)
class Launch:
    """Block and grid sizes; None picks the default (interpreter tests pass larger blocks)."""

    block_t: Optional[int] = None
    num_programs: Optional[int] = None
    num_warps: Optional[int] = None
