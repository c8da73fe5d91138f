"""Every assistant turn ends with a target that stops generation, whatever the chat template's family
(shared case chat-template-no-stop-token: a GLM-style template left no stop token among the targets)."""

import pytest
from transformers import AutoTokenizer

from distrib_ft.data.formats import IGNORE_INDEX, encode_record

CONV = {"messages": [{"role": "system", "content": "you add numbers"},
                     {"role": "user", "content": "what is 0 plus 1?"}, {"role": "assistant", "content": "it is 1."},
                     {"role": "user", "content": "and 0 plus 2?"}, {"role": "assistant", "content": "it is 2."}]}

TEMPLATES = {
    # family: (template, tokens to register as special, the stop token each turn must end with)
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", [], ["<|im_end|>", "<|im_end|>"]),
    "llama3": ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
               "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
               "\n\n{% endif %}", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               ["<|eot_id|>", "<|eot_id|>"]),
    "mistral": ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}</s>{% else %}"
                "[INST] {{ m['content'] }} [/INST]{% endif %}{% endfor %}", ["</s>", "[INST]", "[/INST]"],
                ["</s>", "</s>"]),
    # GLM style: nothing closes a turn but the next role marker; the last turn gets eos appended.
    "glm": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", [], ["<|im_start|>", "<|im_end|>"]),
}


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_each_assistant_turn_ends_with_a_stop_token(tiny_model_dir, family):
    template, specials, stops = TEMPLATES[family]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    tok.chat_template = template
    ex = encode_record(CONV, "chat", "conv.jsonl:1", tokenizer=tok, max_seq_length=512, prompt_template="auto")
    runs, run = [], []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    texts = [tok.decode(r) for r in runs]
    assert [x.startswith(("it is 1.", "it is 2.")) for x in texts] == [True, True], texts
    assert [tok.convert_ids_to_tokens(r[-1]) for r in runs] == stops, texts
