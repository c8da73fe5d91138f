"""Weight decay and layer-wise learning rates reach the optimizer on every ZeRO stage: AdamW's first update of the
``full`` method (weight_decay 0.1, layerwise_lr_decay 0.5) on ZeRO-0, 2 and 3 equals plain ``torch.optim.AdamW``
with one group per parameter (its own LR, decay on weights of two or more dimensions only).

Under ZeRO-3 the model loads partitioned (``zero.Init``): every weight is an empty 1-D placeholder with its real
shape in ``ds_shape``, and grouping by ``p.ndim`` put every weight in the no-decay groups (the saved
``zero_pp_rank_*_optim_states.pt`` showed weight_decay 0.0 in every group). DeepSpeed's ZeRO-3 optimizer keeps the
groups it is given (stage3.py: one flat fp32 partition per group, stepped with that group's hyperparameters).
"""

import deepspeed
import pytest
import torch

from distrib_ft.config import config_from_dict
from distrib_ft.methods import build_method
from distrib_ft.model import load_model
from distrib_ft.runtime.worker import build_model_engine, start_worker
from tests.jobs import job_dict

LR, WD, DECAY, EPS = 1e-2, 0.1, 0.5, 1e-4
# eps 1e-4, not 1e-8: the first Adam step is lr * g / (|g| + eps), and with a tiny eps a gradient of ~1e-8 (a few
# entries) turns its summation-order rounding into an lr-sized difference between stages; no clipping either.
ATOL = 1e-6  # fp32 rounding; the decay term lr * wd * |w| is up to ~1e-4 here


def _batch():
    return torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))


def _raw(tmp_path, model_dir, zero):
    raw = job_dict(tmp_path, model_dir, zero=zero, max_steps=1, learning_rate=LR, weight_decay=WD,
                   adam_epsilon=EPS, max_grad_norm=0.0, lr_scheduler_type="constant", warmup_ratio=0.0)
    raw["method"] = {"type": "full", "layerwise_lr_decay": DECAY}
    return raw


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """Plain torch: one AdamW group per parameter, built here from the names and full shapes."""
    raw = _raw(tmp_path_factory.mktemp("ref"), tiny_model_dir, 0)
    method = build_method(config_from_dict(raw).method)
    model = method.apply(load_model(str(tiny_model_dir)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hyper = {n: (LR * method.lr_scale(n), WD if p.ndim >= 2 else 0.0) for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([{"params": [p], "lr": hyper[n][0], "weight_decay": hyper[n][1]}
                             for n, p in model.named_parameters()], lr=LR, eps=EPS)
    ids = _batch()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    delta = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    return before, delta, hyper


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_first_update_has_weight_decay_and_layerwise_lr_on_every_zero_stage(tmp_path, tiny_model_dir, reference,
                                                                            zero):
    before, expected, hyper = reference
    # the check can fail: the decay term and the LR scales are well above the tolerance
    assert max(lr * wd * before[n].abs().max().item() for n, (lr, wd) in hyper.items()) > 50 * ATOL
    assert len({lr for lr, _ in hyper.values()}) == 3  # head 1, layer 1 d, layer 0 d^2 (= the embeddings' d^L)
    job = start_worker(config_from_dict(_raw(tmp_path, tiny_model_dir, zero)))
    engine, _, _, _ = build_model_engine(job, total_steps=1, warmup_steps=0)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    assert sorted((g["lr"], g["weight_decay"]) for g in inner.param_groups) == sorted(set(hyper.values()))
    ids = _batch()
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=zero == 3):
        delta = {n: p.detach().clone() - before[n] for n, p in params.items()}
    assert delta.keys() == expected.keys()
    worst = max(delta, key=lambda n: (delta[n] - expected[n]).abs().max().item())
    err = (delta[worst] - expected[worst]).abs().max().item()
    assert err < ATOL, (f"ZeRO-{zero}: {worst} (lr {hyper[worst][0]:g}, weight_decay {hyper[worst][1]:g}) moved "
                        f"{err:.2e} away from torch AdamW's first update")


def test_a_checkpoint_with_other_parameter_groups_is_a_one_line_resume_error(tmp_path, tiny_model_dir):
    """ZeRO-3 checkpoints written before the fix have fewer groups (no decayed ones); here the other grouping comes
    from layerwise_lr_decay (5 groups saved, 2 built). checkpoint.load_checkpoint names the checkpoint."""
    from distrib_ft.runtime.checkpoint import load_checkpoint

    def engine_for(decay):
        raw = _raw(tmp_path / f"d{decay}", tiny_model_dir, 3)
        raw["method"]["layerwise_lr_decay"] = decay
        return build_model_engine(start_worker(config_from_dict(raw)), total_steps=1, warmup_steps=0)[0]

    saved = engine_for(DECAY)
    saved.save_checkpoint(str(tmp_path / "ckpt"), tag="step-0", client_state={"step": 0}, save_latest=False)
    with pytest.raises(ValueError, match=r"^--resume: .*step-0: its optimizer state has another number of parameter "
                                         r"groups than this job builds"):
        load_checkpoint(engine_for(1.0), tmp_path / "ckpt" / "step-0", exclude_frozen=False)


def test_zero3_universal_resume_with_several_groups_takes_the_same_next_step(tmp_path, tiny_model_dir):
    """reshard.load_universal (a resume at another world size; here at the same size of one, which is the same
    code) of a ZeRO-3 checkpoint with several groups: the next update equals the uninterrupted engine's. DeepSpeed's
    stage-3 universal load shares one 'step' tensor among the groups' states; AdamW then counted every group's step
    into it (5 groups here: the next step ran as step 4, 5, ..., 8 of Adam's bias correction, 7e-4 off without the
    fix; the 1 -> 2 worker resume of full with weight decay was off by ~1e-3 three steps later)."""
    from distrib_ft.runtime.reshard import load_universal

    def engine():
        return build_model_engine(start_worker(config_from_dict(_raw(tmp_path, tiny_model_dir, 3))), total_steps=4,
                                  warmup_steps=0)[0]

    def step(e, seed):
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(seed))
        e.backward(e(input_ids=ids, labels=ids).loss)
        e.step()

    def weights(e):
        params = dict(e.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().clone() for n, p in params.items()}

    a = engine()
    assert len(a.optimizer.fp16_groups) > 1
    for seed in range(3):
        step(a, seed)
    a.save_checkpoint(str(tmp_path / "ckpt"), tag="step-3", client_state={"step": 3}, save_latest=False)
    b = engine()
    assert load_universal(b, tmp_path / "ckpt" / "step-3", exclude_frozen=False)["step"] == 3
    step(a, 3)
    step(b, 3)
    want, got = weights(a), weights(b)
    worst = max(want, key=lambda n: (got[n] - want[n]).abs().max().item())
    assert (got[worst] - want[worst]).abs().max().item() < ATOL, worst
