"""The trainer's Adam (nerf/adam.py) against torch.optim.Adam: the same parameters after every step,
with a schedule that changes each group's learning rate, and checkpoints that move either way."""
from __future__ import annotations

import pytest
import torch

from CTNeRFReconLib.nerf.adam import Adam


def _model(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 7, generator=g).requires_grad_(), torch.randn(11, generator=g).requires_grad_(),
            torch.randn(3, 4, 2, generator=g).requires_grad_()]


def _loss(params, k: int):
    # a different quadratic-plus-quartic loss each step, one parameter left without a gradient on odd steps
    a, b, c = params
    loss = ((a - 0.1 * k) ** 2).sum() + (b ** 4).mean() + (a.sum() * b[:3]).sum()
    if k % 2 == 0:
        loss = loss + torch.sin(c).sum()
    return loss


def _groups(params, lrs):
    return [dict(params=[params[0]], lr=lrs[0]), dict(params=params[1:], lr=lrs[1])]


def _steps(opt, params, ks):
    """Steps `ks` of the schedule: each group's learning rate set, then one step of loss k."""
    for k in ks:
        for g, lr in zip(opt.param_groups, (0.05 / (1 + k), 0.2)):
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        _loss(params, k).backward()
        opt.step()
    return opt


def _run(make_opt, params, steps):
    return _steps(make_opt(params), params, range(steps))


def test_the_same_steps_as_torch_adam_with_a_schedule_and_missing_gradients():
    ours, theirs = _model(3), _model(3)
    _run(lambda p: Adam(_groups(p, (1, 1)), betas=(0.9, 0.99)), ours, 40)
    _run(lambda p: torch.optim.Adam(_groups(p, (1, 1)), betas=(0.9, 0.99)), theirs, 40)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (a - b).abs().max()
    # and it did move them (a loss that leaves them alone would pass trivially)
    assert all((a - b).abs().max() > 0.1 for a, b in zip(ours, _model(3)))


@pytest.mark.parametrize("direction", ["torch to ours", "ours to torch"])
def test_a_checkpoint_moves_between_the_two_and_continues_identically(direction):
    make_ours = lambda p: Adam(_groups(p, (1, 1)), betas=(0.9, 0.99))  # noqa: E731
    make_theirs = lambda p: torch.optim.Adam(_groups(p, (1, 1)), betas=(0.9, 0.99))  # noqa: E731
    first, second = (make_theirs, make_ours) if direction == "torch to ours" else (make_ours, make_theirs)
    straight = _model(5)
    _run(make_theirs, straight, 30)
    params = _model(5)
    saved = _run(first, params, 12).state_dict()
    saved = torch.load(_roundtrip(saved), weights_only=True)  # through a file, as a checkpoint goes
    resumed = second(params)
    resumed.load_state_dict(saved)
    _steps(resumed, params, range(12, 30))
    for a, b in zip(params, straight):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), (a - b).abs().max()


def _roundtrip(sd):
    import io
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return buf


def test_a_state_for_another_model_is_refused():
    params = _model(1)
    sd = _run(lambda p: Adam(_groups(p, (1, 1))), params, 2).state_dict()
    with pytest.raises(ValueError, match="parameter groups"):
        Adam([dict(params=params, lr=1)]).load_state_dict(sd)
    other = [torch.zeros(5, 7, requires_grad=True), torch.zeros(12, requires_grad=True),
             torch.zeros(3, 4, 2, requires_grad=True)]
    with pytest.raises(ValueError, match="does not fit"):
        Adam(_groups(other, (1, 1))).load_state_dict(sd)
