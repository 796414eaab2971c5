"""Adam with torch.optim.Adam's update and state format, without torch.optim's start-up cost.

Why not torch.optim.Adam: in torch 2.13 every Optimizer method (`add_param_group` in the
constructor, `zero_grad`, `step`, `state_dict`) imports torch._dynamo on first use, which takes
2.2 s on the team's 2-core machines: about as long as importing torch itself. Every worker start
(each Slicer run, each resume, each CLI reconstruction) paid it before its first iteration. This
class does the same arithmetic as torch's single-tensor Adam (the path torch takes on the CPU: no
weight decay, no AMSGrad; Testing/test_adam.py checks the parameters agree step by step) and reads
and writes the same `state_dict` layout, so checkpoints written by either resume with the other.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

TORCH_GROUP_DEFAULTS = dict(weight_decay=0.0, amsgrad=False, maximize=False, foreach=None, capturable=False,
                            differentiable=False, fused=None, decoupled_weight_decay=False)
"""The group options torch.optim.Adam stores beside lr, betas and eps, at the values this class
implements: written into every state_dict, so that an earlier build of the product (which used
torch.optim.Adam, whose load_state_dict takes every option from the file) resumes its checkpoints."""


class Adam:
    """Adam (Kingma & Ba 2015) over parameter groups, each a dict with "params" and "lr"; `betas`
    and `eps` as in torch.optim.Adam. `param_groups` may be edited (the trainer's schedule sets
    each group's "lr" every step)."""

    def __init__(self, groups: Iterable, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 lr: float = 1e-3):
        groups = list(groups)
        if groups and not isinstance(groups[0], dict):
            groups = [dict(params=groups)]
        self.param_groups: list[dict] = []
        for g in groups:
            params = list(g["params"])
            if not all(isinstance(p, torch.Tensor) for p in params):
                raise TypeError("Adam: every group's params must be tensors")
            self.param_groups.append(dict(g, params=params, lr=float(g.get("lr", lr)),
                                          betas=tuple(g.get("betas", betas)), eps=float(g.get("eps", eps))))
        self.state: dict[torch.Tensor, dict] = {}

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self._params():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        for g in self.param_groups:
            beta1, beta2 = g["betas"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state.get(p)
                if st is None:
                    st = self.state[p] = dict(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p),
                                              exp_avg_sq=torch.zeros_like(p))
                st["step"] += 1
                t = float(st["step"])
                grad = p.grad
                st["exp_avg"].lerp_(grad, 1 - beta1)
                st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                bias1 = 1 - beta1 ** t
                bias2_sqrt = math.sqrt(1 - beta2 ** t)
                denom = (st["exp_avg_sq"].sqrt() / bias2_sqrt).add_(g["eps"])
                p.addcdiv_(st["exp_avg"], denom, value=-g["lr"] / bias1)

    # -- torch.optim's state_dict layout: parameters by their index over all groups -----------------
    def state_dict(self) -> dict:
        index = {id(p): k for k, p in enumerate(self._params())}
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            options = {k: v for k, v in g.items() if k != "params"}
            groups.append(dict(TORCH_GROUP_DEFAULTS, **options, params=list(range(start, start + n))))
            start += n
        state = {index[id(p)]: dict(st) for p, st in self.state.items() if id(p) in index}
        return dict(state=state, param_groups=groups)

    def load_state_dict(self, sd: dict) -> None:
        """Load a state written by this class or by torch.optim.Adam; the groups must match in
        number and size (ValueError otherwise), as torch requires."""
        saved = sd["param_groups"]
        if len(saved) != len(self.param_groups):
            raise ValueError(f"the optimiser state has {len(saved)} parameter groups, "
                             f"this model {len(self.param_groups)}")
        if any(len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)):
            raise ValueError("the optimiser state's parameter groups differ in size from this model's")
        by_index = {}
        for s, g in zip(saved, self.param_groups):
            for k, p in zip(s["params"], g["params"]):
                by_index[k] = p
        state = {}
        for k, st in sd["state"].items():
            p = by_index[k]
            new = {}
            for name in ("exp_avg", "exp_avg_sq"):
                v = st[name]
                if not isinstance(v, torch.Tensor) or v.shape != p.shape:
                    raise ValueError(f"the optimiser state's {name} of parameter {k} does not fit the model")
                new[name] = v.to(device=p.device, dtype=p.dtype).clone()
            new["step"] = torch.as_tensor(float(st["step"]), dtype=torch.float32)
            state[p] = new
        for s, g in zip(saved, self.param_groups):
            for key in ("lr", "betas", "eps"):
                if key in s:
                    g[key] = tuple(s[key]) if key == "betas" else float(s[key])
        self.state = state
