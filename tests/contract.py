"""The contract every method and every defence meets, run on the tiny model in-process (a world of one).

``run_contract(tmp_path, raw)`` trains ``raw`` for 4 steps with checkpoints at 2 and 4 through the loop's
own parts (setup -> run_steps -> finish), then resumes a copy from step 2, and returns what the rows
of tests/integration/test_methods.py and tests/integration/test_strategies.py assert on.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from distrib_ft.config import config_from_dict
from distrib_ft.methods import load_trained
from distrib_ft.model import load_model
from distrib_ft.preservation import exported
from distrib_ft.runtime.loop import finish, run_steps, setup, train
from distrib_ft.runtime.loss import drop_virtual_tokens
from distrib_ft.runtime.metrics import read_metrics
from distrib_ft.runtime.worker import start_worker
from tests.jobs import set_in

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11, 64]])


@dataclass
class Contract:
    trainable: int
    total: int
    trainable_names: set[str]
    frozen_before: dict[str, torch.Tensor]
    frozen_after: dict[str, torch.Tensor]
    trained_logits: torch.Tensor
    final_logits: torch.Tensor
    base_logits: torch.Tensor
    final_files: dict[str, torch.Tensor]
    resumed_files: dict[str, torch.Tensor]
    lines: list[dict]
    resumed_lines: list[dict]
    client_state: dict
    checkpoint_keys: set[str]
    summary: dict


def _final_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def run_contract(tmp_path: Path, raw: dict) -> Contract:
    raw = set_in(raw, "training", {**raw["training"], "max_steps": 4, "save_steps": 2, "save_total_limit": 3,
                                   "output_dir": str(tmp_path / "a" / "out")})
    run = setup(start_worker(config_from_dict(raw)), resume=False)
    module = run.engine.module
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    run_steps(run)
    frozen_after = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    with torch.no_grad(), exported(run.defences, module):  # the weights the job exports (the EMA, if on)
        trained_logits = drop_virtual_tokens(module.eval()(input_ids=IDS).logits, IDS).clone()  # prompt tuning
    module.train()
    summary = finish(run, None)
    a = Path(raw["training"]["output_dir"])
    state = torch.load(a / "checkpoints" / "step-4" / "mp_rank_00_model_states.pt", weights_only=False)

    b = tmp_path / "b" / "out"  # interrupted after the step-2 checkpoint, then resumed
    shutil.copytree(a, b)
    for gone in ("final", "checkpoints/step-4", "summary.json"):
        shutil.rmtree(b / gone) if (b / gone).is_dir() else (b / gone).unlink()
    train(config_from_dict(set_in(json.loads(json.dumps(raw)), "training.output_dir", str(b))), resume=True)

    base = raw["model"]["name_or_path"]
    with torch.no_grad():
        final = load_trained(base, a / "final", load_model=load_model).eval()
        final_logits = drop_virtual_tokens(final(input_ids=IDS).logits, IDS)
        base_logits = load_model(base).eval()(input_ids=IDS).logits
    return Contract(trainable=summary["trainable_parameters"], total=summary["total_parameters"],
                    trainable_names={n for n, p in module.named_parameters() if p.requires_grad},
                    frozen_before=frozen_before, frozen_after=frozen_after, trained_logits=trained_logits,
                    final_logits=final_logits, base_logits=base_logits, final_files=_final_tensors(a / "final"),
                    resumed_files=_final_tensors(b / "final"), lines=read_metrics(a / "metrics.jsonl"),
                    resumed_lines=read_metrics(b / "metrics.jsonl"), client_state=state,
                    checkpoint_keys=set(state["module"]), summary=summary)


def assert_common(c: Contract) -> None:
    """What holds for every method and every defence."""
    for n, before in c.frozen_before.items():  # frozen parameters are bit-equal after training
        torch.testing.assert_close(c.frozen_after[n], before, rtol=0, atol=0, msg=n)
    assert c.final_files and c.final_files.keys() == c.resumed_files.keys()
    for k, v in c.final_files.items():  # resume is bit-identical
        torch.testing.assert_close(c.resumed_files[k], v, rtol=0, atol=0, msg=k)
    assert [(r["step"], r.get("loss")) for r in c.resumed_lines] == [(r["step"], r.get("loss")) for r in c.lines]
    # final/ loads back and gives the trained model's logits; training changed them
    torch.testing.assert_close(c.final_logits, c.trained_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(c.final_logits, c.base_logits)
