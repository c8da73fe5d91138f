"""The EMA of the trained weights in the real loop (one in-process rank, tiny model, LoRA, ZeRO-2): final/ holds
the EMA computed by hand from the weights after each optimizer step, not the last weights; the monitor's
evaluations are of the EMA; the monitor's rollback exports the chosen checkpoint's EMA. (Exact resume: the
contract row in tests/integration/test_strategies.py.)"""

import json

import pytest
import torch
from safetensors.torch import load_file

from distrib_ft.config import config_from_dict
from distrib_ft.methods import load_trained
from distrib_ft.model import load_model
from distrib_ft.monitor.evaluation import evaluate_nll
from distrib_ft.runtime.loop import finish, run_steps, setup
from distrib_ft.runtime.worker import start_worker
from tests.jobs import job_dict, toy_alpaca

DECAY = 0.5


class Weights:
    """Observes the loop (after_step): the trained parameters after every optimizer step."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def after_step(self, model, step):
        self.after[step] = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bf16", [False, True])
def test_final_is_the_ema_of_the_per_step_weights_and_the_monitor_evaluates_it(tmp_path, tiny_model_dir, bf16):
    raw = job_dict(tmp_path, tiny_model_dir, zero=2, learning_rate=0.1, max_steps=3, bf16=bf16)
    raw["data"]["eval_files"] = [str(toy_alpaca(tmp_path / "eval.jsonl", n=8, seed=3))]
    # a checkpoint at each evaluation; at this LR the EMA's eval loss is lowest before step 3, so finish rolls back
    raw["monitor"] = {"policy": "rollback", "eval_at": [0, 1, 2, 3]}
    raw["ema"] = {"decay": DECAY}
    run = setup(start_worker(config_from_dict(raw)), resume=False)
    start = {n: p.detach().float().clone() for n, p in run.engine.module.named_parameters() if p.requires_grad}
    seen = Weights()
    run.defences.append(seen)
    run_steps(run)
    summary = finish(run, None)

    ema = {0: start}  # by hand: ema_k = decay ema_{k-1} + (1 - decay) theta_k
    for k in (1, 2, 3):
        ema[k] = {n: DECAY * ema[k - 1][n] + (1 - DECAY) * seen.after[k][n] for n in start}
    chosen = summary["chosen_step"]
    assert summary["decision"] == "rolled_back" and chosen in (1, 2)  # the rollback restores that step's EMA
    final = load_file(tmp_path / "out" / "final" / "adapter_model.safetensors")
    assert len(final) == len(start)
    for n in start:
        exported = final[n.replace(".default", "")]
        torch.testing.assert_close(exported, ema[chosen][n], rtol=0, atol=1e-6, msg=n)
    # the expected direction: the EMA lags behind the training weights, nearer the start than they are
    moved = torch.stack([(ema[chosen][n] - start[n]).norm() for n in start]).norm()
    trained = torch.stack([(seen.after[chosen][n] - start[n]).norm() for n in start]).norm()
    assert 0 < moved < 0.9 * trained, (moved, trained)

    # the monitor's numbers are the exported model's: final/ reloaded gives the logged eval_loss of its step
    # (bf16: the monitor ran the EMA rounded to bf16, final/ holds it in fp32)
    logged = {r["step"]: r["eval_loss"] for r in map(json.loads, (tmp_path / "out" / "metrics.jsonl").open())
              if "eval_loss" in r}
    model = load_trained(str(tiny_model_dir), tmp_path / "out" / "final", load_model=load_model).eval()
    with torch.no_grad():
        loss = evaluate_nll(model, run.eval_ds, batch_size=4, pad_token_id=run.tokenizer.pad_token_id)["eval_loss"]
    assert abs(loss - logged[chosen]) <= (2e-3 if bf16 else 1e-5) * abs(loss), (loss, logged)
