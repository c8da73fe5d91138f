"""Prompt tuning (distrib_ft/methods/prompt_tuning.py): what trains, its two inits, its final/, what it refuses, and
every path that reads a prompt-tuned model's logits (they come back (B, P + T, V)) checked against peft's own forward:
the training loss and its masks, the eval NLL, the KL-to-base drift, the Fisher pass, token masking's per-token NLL,
the multiple-choice scorer and generation (the decoded answer is the new tokens only)."""

import json
import math

import pytest
import torch
from peft import PeftModel, TaskType, get_peft_model
from peft import PromptTuningConfig as PeftPromptTuningConfig
from safetensors.torch import load_file

from distrib_ft.config import config_from_dict
from distrib_ft.data.formats import build_dataset, collate
from distrib_ft.methods import METHODS, build_method, load_trained
from distrib_ft.methods.prompt_tuning import PromptTuningConfig
from distrib_ft.model import load_model
from distrib_ft.monitor.drift import base_top_k, kl_to_base
from distrib_ft.monitor.evaluation import evaluate_nll
from distrib_ft.monitor.generation import generate_batch, score_generations
from distrib_ft.preservation.ewc import EWC, EWCConfig
from distrib_ft.preservation.fisher import compute_fisher
from distrib_ft.preservation.token_masking import base_token_nll
from distrib_ft.runtime.loss import drop_virtual_tokens, token_nll_rows, token_nll_sum
from tests.jobs import job_dict

P, HIDDEN = 4, 32  # virtual tokens; the tiny model's hidden size
NAME = "prompt_encoder.default.embedding.weight"


def prompt_model(model_dir, **section):
    """The tiny model with a prompt-tuning method applied (random init unless init_text), in eval mode."""
    torch.manual_seed(0)
    method = build_method(PromptTuningConfig.model_validate({"type": "prompt_tuning", "num_virtual_tokens": P,
                                                             **section}))
    return method.apply(load_model(str(model_dir))).eval(), method


@pytest.fixture(scope="module")
def tuned(tiny_model_dir):
    return prompt_model(tiny_model_dir)[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("pt") / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"convert {a} km to m", "input": "x " * (a % 3),
                                        "output": f"{a} km = {a * 1000} m" + " ok" * a}) + "\n" for a in range(1, 8)))
    ds, _ = build_dataset([str(path)], "alpaca", tiny_tokenizer, 64)
    assert len({len(ds[i]["input_ids"]) for i in range(len(ds))}) > 3  # batches are padded
    return ds


def peft_loss(model, example) -> tuple[float, int]:
    """peft's own forward with labels on one unpadded example: (mean NLL over its targets, target count)."""
    ids, labels = torch.tensor([example["input_ids"]]), torch.tensor([example["labels"]])
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
    return float(loss), int((labels[:, 1:] != -100).sum())


def test_trains_only_the_prompt_and_counts(tuned):
    trainable = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    assert list(trainable) == [NAME] and trainable[NAME].shape == (P, HIDDEN)
    assert "word_embeddings.weight" not in tuned.state_dict()  # no alias of the frozen matrix in checkpoints
    assert tuned.word_embeddings is tuned.get_input_embeddings()  # what peft's forward reads
    ids = torch.tensor([[5, 17, 42]])
    assert tuned(input_ids=ids).logits.shape == (1, P + 3, 384)


def test_text_init_copies_the_embeddings_of_the_text(tiny_model_dir, tiny_tokenizer):
    model, _ = prompt_model(tiny_model_dir, init_text="km")
    ids = tiny_tokenizer("km")["input_ids"]
    rows = (ids * P)[:P]  # peft repeats the text's tokens up to P
    torch.testing.assert_close(dict(model.named_parameters())[NAME].detach(),
                               model.get_input_embeddings().weight[rows].detach(), rtol=0, atol=0)
    assert model.peft_config["default"].tokenizer_name_or_path == str(tiny_model_dir)


def test_config_refusals(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="empty text"):
        PromptTuningConfig.model_validate({"type": "prompt_tuning", "init_text": "  "})
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuningConfig.model_validate({"type": "prompt_tuning", "num_virtual_tokens": 0})
    method = METHODS["prompt_tuning"](PromptTuningConfig())
    assert method.mergeable is False and method.new_parameters and not method.merged_update
    raw = job_dict(tmp_path, tiny_model_dir)
    raw["method"] = {"type": "prompt_tuning"}
    method.check(zero_stage=3, config=config_from_dict(raw))  # ZeRO-3 runs (tests/distributed/test_zero_gloo.py)
    raw["data"]["packing"] = True
    with pytest.raises(ValueError, match=r"^data\.packing: .*set data\.packing: false$"):
        method.check(zero_stage=2, config=config_from_dict(raw))


def test_ewc_on_the_prompt_works_and_what_cannot_apply_is_refused(tmp_path, tiny_model_dir, tuned, dataset):
    raw = job_dict(tmp_path, tiny_model_dir)
    raw["method"] = {"type": "prompt_tuning"}
    job = config_from_dict(raw)
    with pytest.raises(ValueError, match="^ewc.target: lora_merged needs"):
        EWCConfig(lambda_=1.0, target="lora_merged", fisher_data_files=[str(tmp_path / "train.jsonl")]).check_job(job)
    with pytest.raises(ValueError, match="^ewc.fisher_path: method prompt_tuning trains fresh parameters"):
        EWCConfig(lambda_=1.0, fisher_path=str(tmp_path / "train.jsonl")).check_job(job)
    ewc = EWC(EWCConfig(lambda_=1.0, fisher_data_files=[str(tmp_path / "train.jsonl")]))
    ewc.check(zero_stage=2, model=tuned)
    assert list(ewc.fisher_params(tuned)) == [NAME]  # target trainable: F over the soft prompt


def test_training_loss_and_masks_equal_peft_forward_with_labels(tuned, dataset, tiny_tokenizer):
    examples = [dataset[i] for i in range(len(dataset))]
    batch = collate(examples, tiny_tokenizer.pad_token_id)  # right-padded: peft prepends ones to the mask
    with torch.no_grad():
        nll, targets = token_nll_rows(tuned, batch)
    for i, e in enumerate(examples):
        loss, n = peft_loss(tuned, e)
        assert int(targets[i]) == n
        assert float(nll[i]) / n == pytest.approx(loss, rel=1e-5)


def test_eval_nll_equals_peft_forward_with_labels(tuned, dataset, tiny_tokenizer):
    got = evaluate_nll(tuned, dataset, batch_size=3, pad_token_id=tiny_tokenizer.pad_token_id)
    parts = [peft_loss(tuned, dataset[i]) for i in range(len(dataset))]
    want = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
    assert got["eval_tokens"] == sum(n for _, n in parts)
    assert got["eval_loss"] == pytest.approx(want, rel=1e-5)
    with tuned.disable_adapter():  # the soft prompt changes the loss: the check above is not the base's
        base = evaluate_nll(tuned, dataset, batch_size=3, pad_token_id=tiny_tokenizer.pad_token_id)["eval_loss"]
    assert abs(base - want) > 1e-4


def test_kl_to_base_of_the_prompt_against_the_base(tiny_model_dir, tuned, dataset, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    base = load_model(str(tiny_model_dir)).eval()
    cache = base_top_k(base, dataset, k=384, batch_size=3, pad_token_id=pad)
    got = kl_to_base(tuned, dataset, cache, batch_size=3, pad_token_id=pad)
    total, count = 0.0, 0
    for i in range(len(dataset)):
        ids, labels = torch.tensor([dataset[i]["input_ids"]]), torch.tensor([dataset[i]["labels"]])
        with torch.no_grad():
            lp_b = torch.log_softmax(base(input_ids=ids).logits[0, :-1], -1)
            lp_t = torch.log_softmax(tuned(input_ids=ids).logits[0, P:-1], -1)  # the real tokens: after the P
        mask = labels[0, 1:] != -100
        total += float((lp_b.exp() * (lp_b - lp_t)).sum(-1)[mask].sum())
        count += int(mask.sum())
    assert total / count > 1e-5 and got["kl_to_base"] == pytest.approx(total / count, rel=1e-3, abs=1e-7)


def test_fisher_of_the_prompt_equals_per_sequence_gradients(tuned, dataset, tiny_tokenizer):
    examples = [dataset[i] for i in range(4)]
    params = {n: p for n, p in tuned.named_parameters() if p.requires_grad}
    fisher, info = compute_fisher(tuned, params, examples, lambda b: collate(b, tiny_tokenizer.pad_token_id),
                                  estimator="empirical", progress=False)
    want = torch.zeros(P, HIDDEN)
    for e in examples:  # the gradient of log p(sequence) through peft's own loss
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor([e["labels"]])
        loss = tuned(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        (g,) = torch.autograd.grad(-loss * int((labels[:, 1:] != -100).sum()), [params[NAME]])
        want += g.square() / len(examples)
    assert info["sequences"] == 4 and float(want.abs().max()) > 0
    torch.testing.assert_close(fisher[NAME], want, rtol=1e-4, atol=1e-10)


def test_token_masking_nll_per_token_equals_peft_forward(tuned, dataset, tiny_tokenizer):
    got = base_token_nll(tuned, dataset, batch_size=3, pad_token_id=tiny_tokenizer.pad_token_id)
    for i in range(len(dataset)):
        ids, labels = torch.tensor([dataset[i]["input_ids"]]), dataset[i]["labels"]
        with torch.no_grad():
            lp = torch.log_softmax(tuned(input_ids=ids).logits[0, P:], -1)
        want = [math.nan] + [float(-lp[t - 1, labels[t]]) if labels[t] != -100 else math.nan
                             for t in range(1, len(labels))]
        assert len(got[i]) == len(want)
        torch.testing.assert_close(torch.tensor(got[i], dtype=torch.float32), torch.tensor(want, dtype=torch.float32),
                                   rtol=1e-4, atol=1e-5, equal_nan=True)


def _prompts(tokenizer):
    return [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
            for c in ("hello", "convert 3 km to m", "the quick brown fox jumps over the lazy dog, then")]


def _greedy_by_hand(model, tokenizer, prompt: str, new: int) -> str:
    """Greedy decoding through full forwards of the prompt-tuned model, no cache, the virtual tokens dropped."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(new):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits
        assert logits.shape[1] == P + len(ids) + len(out)
        token = int(logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def test_generation_decodes_the_new_tokens_only(tuned, tiny_tokenizer):
    texts, base_texts = [], []
    for prompt in _prompts(tiny_tokenizer):
        ((text, _),) = generate_batch(tuned, tiny_tokenizer, [prompt], max_new_tokens=6, device="cpu", synced=False)
        assert text == _greedy_by_hand(tuned, tiny_tokenizer, prompt, 6)
        texts.append(text)
        with tuned.disable_adapter():
            ((base_text, _),) = generate_batch(tuned, tiny_tokenizer, [prompt], max_new_tokens=6, device="cpu",
                                               synced=False)
        base_texts.append(base_text)
    assert all(texts) and texts != base_texts  # the soft prompt was used (peft's generate, not the base's)


def _step_logits(model, tokenizer, prompts, new: int) -> list[list[torch.Tensor]]:
    """Per prompt, the logits of each greedy step of one left-padded ``generate`` over all the prompts."""
    pad = tokenizer.pad_token_id
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(map(len, ids))
    out = model.generate(input_ids=torch.tensor([[pad] * (width - len(x)) + x for x in ids]),
                         attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]),
                         max_new_tokens=new, do_sample=False, pad_token_id=pad, output_scores=True,
                         return_dict_in_generate=True)
    steps = []
    for r in range(len(ids)):
        new_ids = out.sequences[r, width:].tolist()
        end = new_ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in new_ids else len(out.scores)
        steps.append([(ids[r], new_ids[:s], out.scores[s][r]) for s in range(end)])
    return steps


def _by_hand_error(model, steps) -> float:
    """The largest gap between generate's logits and a full forward of the same prompt alone, unpadded."""
    worst = 0.0
    for row in steps:
        for ids, generated, scores in row:
            with torch.no_grad():
                full = drop_virtual_tokens(model(input_ids=torch.tensor([ids + generated])).logits,
                                           torch.tensor([ids + generated]))[0, -1]
            worst = max(worst, float((scores - full).abs().max()))
    return worst


def test_left_padded_generation_equals_each_prompt_alone(tiny_model_dir, tuned, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    assert _by_hand_error(tuned, _step_logits(tuned, tiny_tokenizer, prompts, 4)) < 1e-5
    together = score_generations(tuned, tiny_tokenizer, [{"prompt": p, "reference": "", "choices": None}
                                                         for p in prompts], metric="exact_match", max_new_tokens=6,
                                 batch_size=3, device="cpu")
    assert [x["generation"] for x in together["samples"]] == [_greedy_by_hand(tuned, tiny_tokenizer, p, 6)
                                                              for p in prompts]
    # what fix_generation is for: peft's own generate, unfixed, is off (if this fails, peft fixed it upstream)
    torch.manual_seed(0)
    raw = get_peft_model(load_model(str(tiny_model_dir)),
                         PeftPromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P)).eval()
    assert _by_hand_error(raw, _step_logits(raw, tiny_tokenizer, prompts, 4)) > 1e-3


def test_multiple_choice_scores_equal_peft_forward(tuned, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    choices = [[" yes", " no", " maybe so"], [" 3000 m", " 30 m"], [" dog", " cat", " fox"]]

    def logprob(prompt, choice):
        p = tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tiny_tokenizer(choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(tuned(input_ids=torch.tensor([p + c])).logits[0, P:], -1)
        return sum(float(lp[len(p) + j - 1, t]) for j, t in enumerate(c))

    best = [max(cs, key=lambda c, p=p: logprob(p, c)) for p, cs in zip(prompts, choices)]
    worst = [min(cs, key=lambda c, p=p: logprob(p, c)) for p, cs in zip(prompts, choices)]
    assert best != worst
    examples = [{"prompt": p, "reference": r, "choices": cs} for p, r, cs in zip(prompts, best, choices)]
    res = score_generations(tuned, tiny_tokenizer, examples, metric="multiple_choice", batch_size=3, device="cpu")
    assert (res["correct"], res["count"]) == (3, 3)
    res = score_generations(tuned, tiny_tokenizer, [dict(e, reference=w) for e, w in zip(examples, worst)],
                            metric="multiple_choice", batch_size=3, device="cpu")
    assert res["correct"] == 0


def test_export_writes_the_given_fp32_values_and_loads_back(tmp_path, tiny_model_dir, tiny_tokenizer):
    model, method = prompt_model(tiny_model_dir, init_text="convert")
    trained = torch.randn(P, HIDDEN)  # e.g. the optimizer's fp32 master copy; the module may hold bf16 or a shard
    method.export(model, {NAME: trained}, tmp_path)
    assert load_file(tmp_path / "adapter_model.safetensors").keys() == {"prompt_embeddings"}
    torch.testing.assert_close(load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"], trained,
                               rtol=0, atol=0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == P and config["inference_mode"]
    assert model.peft_config["default"].inference_mode is False  # the live model's config is untouched
    loaded = load_trained(str(tiny_model_dir), tmp_path, load_model=load_model).eval()
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        dict(model.named_parameters())[NAME].copy_(trained)
        ids = torch.tensor([[5, 17, 42, 99]])
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    prompts = _prompts(tiny_tokenizer)  # loaded through the method (owns_final): generate is fixed there too
    assert _by_hand_error(loaded, _step_logits(loaded, tiny_tokenizer, prompts, 3)) < 1e-5


def test_token_nll_sum_of_a_padded_row_equals_the_row_alone(tuned, dataset, tiny_tokenizer):
    short = min(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    longer = max(range(len(dataset)), key=lambda i: len(dataset[i]["input_ids"]))
    pad = tiny_tokenizer.pad_token_id
    with torch.no_grad():
        alone = token_nll_sum(tuned, collate([dataset[short]], pad))
        nll, _ = token_nll_rows(tuned, collate([dataset[short], dataset[longer]], pad))
    assert float(nll[0]) == pytest.approx(float(alone[0]), rel=1e-5)


def test_base_model_view_computes_as_the_base(tiny_model_dir, tuned, dataset, tiny_tokenizer):
    """PromptTuning.base_model: inside it the prompt-tuned model's NLL, KL reference and greedy answers are the base
    model's (what the loop's step-0 baselines read); outside it the prompt is back."""
    from distrib_ft.runtime.loop import as_base

    method = build_method(PromptTuningConfig(num_virtual_tokens=P))
    base = load_model(str(tiny_model_dir)).eval()
    pad = tiny_tokenizer.pad_token_id
    want = evaluate_nll(base, dataset, batch_size=4, pad_token_id=pad)["eval_loss"]
    with as_base(method, tuned):
        assert evaluate_nll(tuned, dataset, batch_size=4, pad_token_id=pad)["eval_loss"] == pytest.approx(want,
                                                                                                        rel=1e-6)
        got = generate_batch(tuned, tiny_tokenizer, ["convert 3 km to m"], max_new_tokens=5, device="cpu",
                             synced=False)
    assert got == generate_batch(base, tiny_tokenizer, ["convert 3 km to m"], max_new_tokens=5, device="cpu",
                                 synced=False)
    assert evaluate_nll(tuned, dataset, batch_size=4, pad_token_id=pad)["eval_loss"] != pytest.approx(want, rel=1e-6)
