"""L2-SP's penalty and its gradient (Li et al. 2018), without a training loop (the loop: the contract row)."""

import torch

from distrib_ft.preservation.l2_sp import L2SP, L2SPConfig


def test_penalty_gradient_is_alpha_times_the_distance_to_the_start():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    l2 = L2SP(L2SPConfig(alpha=3.0), ctx=None)
    l2._params = dict(model.named_parameters())
    l2.anchors = {n: p.detach().clone() + torch.randn_like(p) for n, p in model.named_parameters()}
    penalty = l2.penalty(model)
    expected = 1.5 * sum(((p.detach() - l2.anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(penalty, expected)
    grads = torch.autograd.grad(penalty, list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(g, 3.0 * (p.detach() - l2.anchors[n]))
    assert l2.metrics() == {"l2_sp_penalty": penalty.item()} and l2.metrics() == {}
    assert not L2SPConfig().enabled and L2SPConfig(alpha=0.1).enabled
