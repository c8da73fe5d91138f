"""BitFit with add_bias: false under ZeRO-3 on 2 gloo ranks equals 1 rank: the biases of partitioned Linear modules."""

import torch

from distrib_ft.model import load_model
from tests.jobs import job_dict


def test_existing_biases_two_ranks_zero3_match_one_rank(tmp_path, biased_model_dir):
    """add_bias: false under ZeRO-3 (the biases of partitioned Linear modules train): 2 ranks x 2 sequences write
    the same final/ and losses as 1 rank x 4 under ZeRO-2."""
    from safetensors.torch import load_file

    from distrib_ft.runtime.metrics import read_metrics
    from tests.jobs import run_ranks

    out = {}
    for world, micro, zero in ((1, 4, 2), (2, 2, 3)):
        d = tmp_path / f"w{world}"
        raw = job_dict(d, biased_model_dir, zero=zero, per_device_train_batch_size=micro, learning_rate=1e-2,
                       max_steps=3)
        raw["method"] = {"type": "bitfit"}
        run_ranks(raw, world, d)
        out[world] = (load_file(d / "out" / "final" / "model.safetensors"),
                      [r["loss"] for r in read_metrics(d / "out" / "metrics.jsonl") if "loss" in r])
    (one, loss1), (two, loss2) = out[1], out[2]
    base = load_model(str(biased_model_dir)).state_dict()
    assert one.keys() == two.keys() == base.keys() and len(loss1) == 3
    assert max(float((one[k] - base[k]).abs().max()) for k in one if k.endswith(".bias")) > 1e-3
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
        if not k.endswith(".bias"):
            torch.testing.assert_close(one[k], base[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(torch.tensor(loss2), torch.tensor(loss1), rtol=1e-5, atol=1e-6)
