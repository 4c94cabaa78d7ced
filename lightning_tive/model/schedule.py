"""The learning-rate schedule: LLaVA's linear warm-up then cosine decay, stepped per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

#: `(optimizer, total_steps) -> scheduler`: what `LlavaModule(lr_scheduler=...)` takes.
SchedulerCallable = Callable[[Optimizer, int], LRScheduler]


class WarmupCosineLR(LambdaLR):
    """Linear warm-up then cosine decay to zero over `total_steps` (LLaVA's schedule)."""

    def __init__(self, optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.03, min_lr_ratio: float = 0.0):
        if total_steps <= 0:
            raise ValueError(f"WarmupCosineLR needs total_steps > 0, got {total_steps}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(math.ceil(warmup_ratio * total_steps))

        def factor(step: int) -> float:
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
