"""The EMA of the trained weights (Polyak and Juditsky 1992; timm's ModelEmaV2), without a training loop: the update
rule, update_every, decay 0 = off, the swap in and out of the module, and the checkpoint's tensors."""

import pytest
import torch

from distrib_ft.preservation import exported, load_tensors
from distrib_ft.preservation.ema import EMA, EMAConfig


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[1].bias.requires_grad_(False)  # frozen: not averaged
    return model


def test_update_rule_update_every_and_swap():
    model = _model()
    ema = EMA(EMAConfig(decay=0.75, update_every=2), ctx=None)
    ema.on_task_start(model, resumed=False)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(ema.shadow) == set(trained)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {n: start[n].clone() for n in trained}
    for step in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        ema.after_step(model, step)
        if step % 2 == 0:  # ema = 0.75 ema + 0.25 theta, every 2nd step only
            expected = {n: 0.75 * expected[n] + 0.25 * dict(model.named_parameters())[n].detach() for n in trained}
        for n in trained:
            torch.testing.assert_close(ema.shadow[n], expected[n], rtol=0, atol=1e-6)
    assert ema.updates == 2 and ema.state_dict() == {"updates": 2, "decay": 0.75}

    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with exported([ema], model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), ema.shadow[n] if n in trained else weights[n], rtol=0, atol=0)
    for n, p in model.named_parameters():  # the training weights are back, bit-equal
        torch.testing.assert_close(p.detach(), weights[n], rtol=0, atol=0)


def test_checkpoint_tensors_restore_the_ema():
    model = _model()
    ema = EMA(EMAConfig(decay=0.5), ctx=None)
    ema.on_task_start(model, resumed=False)
    saved = {n: t + 1.0 for n, t in ema.tensors().items()}

    resumed = EMA(EMAConfig(decay=0.5), ctx=None)  # resume: loaded before on_task_start, which keeps them
    load_tensors([resumed], {"tensors": {"ema": saved}})
    resumed.on_task_start(model, resumed=True)
    for n, t in saved.items():
        torch.testing.assert_close(resumed.shadow[n], t, rtol=0, atol=0)

    load_tensors([ema], {"tensors": {"ema": saved}})  # rollback: into the running EMA
    for n, t in saved.items():
        torch.testing.assert_close(ema.shadow[n], t, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ema: the checkpoint's EMA lacks"):
        load_tensors([ema], {"tensors": {"ema": {"0.weight": saved["0.weight"]}}})


def test_decay_zero_is_off_and_bounds():
    assert not EMAConfig().enabled and EMAConfig(decay=0.999).enabled
    with pytest.raises(ValueError):
        EMAConfig(decay=1.0)
    with pytest.raises(ValueError):
        EMAConfig(decay=0.9, update_every=0)
