"""core/predictions.py and evaluate's predict phase on tiny real models: prompt/label extraction,
batched HF generation against one prompt at a time, llama-server with parallel slots against
llama.cpp's bindings, and the LLaMA-Factory-style files."""

from __future__ import annotations

import json

import pytest

from lorapipe import params as params_mod
from lorapipe.core import parity, predictions
from lorapipe.core.errors import LorapipeError
from lorapipe.core.hfmodel import load_tokenizer

ROWS = [
    {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "I feel low."},
                  {"role": "assistant", "content": "I'm sorry."}, {"role": "user", "content": "Thanks."},
                  {"role": "assistant", "content": "You're welcome."}]},
    {"messages": [{"role": "user", "content": "我很难过。"}, {"role": "assistant", "content": "怎么了？"}]},
    {"messages": [{"role": "user", "content": "no reply"}]},  # nothing to score: skipped
    {"messages": [{"role": "user", "content": "My exam went badly and I feel like a failure today."},
                  {"role": "assistant", "content": "One exam is not you."}]},
]


def test_prompt_is_the_conversation_before_the_last_reply_and_label_that_reply():
    convs, labels = predictions.prompts_and_labels(ROWS, None, 0)
    assert labels == ["You're welcome.", "怎么了？", "One exam is not you."]
    assert convs[0] == ROWS[0]["messages"][:4]  # the system turn and the earlier exchange included
    assert convs[1] == ROWS[1]["messages"][:1]


def test_a_larger_split_gives_a_fixed_seeded_subset_in_file_order():
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(50)]
    _, first = predictions.prompts_and_labels(rows, 10, 3)
    _, again = predictions.prompts_and_labels(rows, 10, 3)
    _, other = predictions.prompts_and_labels(rows, 10, 4)
    assert first == again and first != other and len(first) == 10
    assert first == sorted(first, key=lambda a: int(a[1:]))


def test_params_validate_the_predict_section():
    p = params_mod.parse({"evaluate": {"predict": {"max_rows": None, "batch_size": 2}}})
    assert p.evaluate.predict.max_rows is None and p.evaluate.predict.parallel == 1  # one slot: reproducible answers
    for bad in ({"max_rows": 0}, {"parallel": 0}, {"batch": 3}):
        with pytest.raises(params_mod.ParamsError, match="evaluate.predict"):
            params_mod.parse({"evaluate": {"predict": bad}})


def unbatched(model, tokenizer, texts, max_new_tokens):
    return [predictions.hf_generate(model, tokenizer, [t], max_new_tokens, batch_size=1)[0] for t in texts]


def test_batched_hf_answers_equal_one_prompt_at_a_time(tiny_gguf):
    import torch
    from transformers import AutoModelForCausalLM

    folder, _ = tiny_gguf("scripted")  # answers "Hello world!" then stops, whatever the prompt
    random_folder, _ = tiny_gguf("random")  # never stops within the limit
    tokenizer = load_tokenizer(folder, False)
    convs, _ = predictions.prompts_and_labels(ROWS, None, 0)
    texts = [parity.render(tokenizer, c) for c in convs]
    torch.set_num_threads(1)

    scripted = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    batched = predictions.hf_generate(scripted, tokenizer, texts, 8, batch_size=3)
    assert batched == unbatched(scripted, tokenizer, texts, 8)
    assert all(a.stopped and a.text == "Hello world!" for a in batched)  # special tokens not shown

    noisy = AutoModelForCausalLM.from_pretrained(random_folder, dtype=torch.float32).eval()
    batched = predictions.hf_generate(noisy, tokenizer, texts, 6, batch_size=3)
    # left padding with a mask: the same greedy tokens as each prompt alone
    assert batched == unbatched(noisy, tokenizer, texts, 6)
    assert not any(a.stopped for a in batched)


def bindings_greedy(gguf, texts: list[str], max_new_tokens: int) -> list[tuple[str, bool]]:
    """The reference: greedy decoding one prompt at a time through llama.cpp's bindings."""
    llm = parity.load_gguf(gguf, n_ctx=512, threads=1)
    out = []
    try:
        for text in texts:
            llm.reset()
            new, stopped = [], False
            for token in llm.generate(parity.llama_chat_ids(llm, text), temp=0.0, top_k=1, repeat_penalty=1.0):
                if parity.is_eog(llm, token):
                    stopped = True
                    break
                new.append(token)
                if len(new) >= max_new_tokens:
                    break
            out.append((llm.detokenize(new).decode("utf-8", "replace").rstrip("\ufffd").strip(), stopped))
    finally:
        llm.close()
    return out


def test_llama_server_parallel_answers_equal_the_bindings_greedy_answers(tiny_gguf):
    folder, gguf = tiny_gguf("random")
    tokenizer = load_tokenizer(folder, False)
    convs, _ = predictions.prompts_and_labels(ROWS, None, 0)
    texts = [parity.render(tokenizer, c) for c in convs]
    served = predictions.gguf_generate(gguf, texts, 6, parallel=2, threads=1)
    assert [(a.text, a.stopped) for a in served] == bindings_greedy(gguf, texts, 6)
    assert len(served) == len(texts) and not any(a.stopped for a in served)

    _, scripted = tiny_gguf("scripted")
    answers = predictions.gguf_generate(scripted, texts, 8, parallel=3, threads=1)
    assert all(a.stopped and a.text == "Hello world!" for a in answers)


def test_variant_files_have_llamafactorys_format_and_bad_lines_are_named(tmp_path):
    answers = [predictions.Answer("hi there", True), predictions.Answer("", False)]
    predictions.write_variant(tmp_path / "quant", ["<p1>", "<p2>"], answers, ["hello there", "你好"], {"predict_bleu-4": 1.0})
    lines = (tmp_path / "quant" / "generated_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x) for x in lines] == [{"prompt": "<p1>", "predict": "hi there", "label": "hello there"},
                                              {"prompt": "<p2>", "predict": "", "label": "你好"}]
    assert "你好" in lines[1]  # written as text, as LLaMA-Factory does (ensure_ascii=False)
    assert json.loads((tmp_path / "quant" / "predict_results.json").read_text()) == {"predict_bleu-4": 1.0}
    assert predictions.read_predictions(tmp_path / "quant" / "generated_predictions.jsonl")[1]["label"] == "你好"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + '{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(LorapipeError, match=r"bad.jsonl:2: expected an object"):
        predictions.read_predictions(bad)
