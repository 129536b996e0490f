"""Dinomaly's optimiser and learning-rate schedule.

StableAdamW is written here because no maintained package has the variant the official code
trains with: AdamW with AMSGrad whose step is divided by max(1, RMS(g / denominator) / clip),
weight decay applied with the undivided lr (torch-optimi's and pytorch-optimizer's StableAdamW
have no AMSGrad and compute the RMS from the squared gradient over the second moment). The
update runs on tensor lists (``torch._foreach_*``) and never synchronises with the GPU, except
for the one check per step that ``skip_nonfinite`` asks for.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


class StableAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, optional AMSGrad) with a per-tensor update clipped by the
    RMS of ``grad / denominator`` (Wortsman et al. 2023, as in the Dinomaly code).

    ``skip_nonfinite`` (Dinomaly2's optimiser): a step whose gradients hold a NaN or inf changes
    nothing (weights, moments, step counts) and is counted in ``skipped_steps``, which the
    training loop reads (:attr:`skips_nonfinite` tells it that a step may be skipped)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        clip_threshold: float = 1.0,
        skip_nonfinite: bool = False,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or clip_threshold <= 0:
            raise ValueError("StableAdamW: lr, eps, weight_decay >= 0 and clip_threshold > 0")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"StableAdamW: betas must lie in [0, 1), got {betas}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            clip_threshold=clip_threshold,
        )
        super().__init__(params, defaults)
        self.skips_nonfinite = skip_nonfinite
        #: steps left out because a gradient held a NaN or inf (``skip_nonfinite`` only)
        self.skipped_steps = 0

    def _all_finite(self) -> bool:
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.skips_nonfinite and not self._all_finite():
            self.skipped_steps += 1
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("StableAdamW does not support sparse gradients")
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsgrad"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
            self._update(group, params, grads, states)
        return loss

    @staticmethod
    def _update(group, params, grads, states) -> None:
        lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        exp_avg = [s["exp_avg"] for s in states]
        exp_avg_sq = [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
        second = exp_avg_sq
        if group["amsgrad"]:
            second = [s["max_exp_avg_sq"] for s in states]
            torch._foreach_maximum_(second, exp_avg_sq)
        for state in states:
            state["step"] += 1
        # parameters of one group share their step count unless added mid-training
        for steps in sorted({s["step"] for s in states}):
            idx = [i for i, s in enumerate(states) if s["step"] == steps]
            bias1, bias2 = 1 - beta1**steps, 1 - beta2**steps
            denom = torch._foreach_sqrt([second[i] for i in idx])
            torch._foreach_div_(denom, math.sqrt(bias2))
            torch._foreach_add_(denom, eps)
            ratio = torch._foreach_div([grads[i] for i in idx], denom)
            norms = torch._foreach_norm(ratio)
            for i, d, norm in zip(idx, denom, norms):
                rms = norm / math.sqrt(params[i].numel())
                scale = torch.clamp(rms / group["clip_threshold"], min=1.0)
                params[i].addcdiv_(exp_avg[i] * (-lr / bias1 / scale), d)


def warm_cosine(
    optimizer: torch.optim.Optimizer,
    total: int,
    warmup: int,
    final_ratio: float | None,
    full_at_last_warmup_step: bool = True,
) -> LambdaLR:
    """Dinomaly's WarmCosineScheduler as a factor on each group's lr: ``warmup`` steps rising
    linearly from 0 (``linspace(0, 1, warmup)``, so step ``warmup - 1`` has the full lr; with
    ``full_at_last_warmup_step=False`` step / warmup, as Dinomaly2's WarmupCosineScheduler),
    then a half cosine from 1 down to ``final_ratio`` over the remaining steps (None:
    constant), and ``final_ratio`` from step ``total`` on."""

    def factor(step: int) -> float:
        if step < warmup:
            if not full_at_last_warmup_step:
                return step / warmup
            return step / (warmup - 1) if warmup > 1 else 1.0
        if final_ratio is None:
            return 1.0
        if step >= total:
            return final_ratio
        rest = total - warmup
        return final_ratio + 0.5 * (1 - final_ratio) * (
            1 + math.cos(math.pi * (step - warmup) / rest)
        )

    return LambdaLR(optimizer, factor)
