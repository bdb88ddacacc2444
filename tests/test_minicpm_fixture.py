"""A tiny MiniCPM-1 checkpoint with its own remote code (tests/minicpm_remote/), and what it must do:
load only with trust_remote_code, generate, train packed rows with a LoRA, merge, reload, and
convert with the pinned llama.cpp converter to a GGUF whose logits match the HF model's.

MiniCPM-1 (openbmb/MiniCPM-1B-sft-bf16, MiniCPM-2B-sft-bf16) has no transformers class: a checkpoint
ships configuration_minicpm.py / modeling_minicpm.py named in config.json's auto_map. Real weights are
not available offline, so `make_tiny_minicpm` writes such a checkpoint at random weights: the test
remote code (Llama + scale_emb / scale_depth / dim_model_base, tied head), a config.json in the real
checkpoint's layout, and a SentencePiece tokenizer. Other tests import it:
`from test_minicpm_fixture import make_tiny_minicpm` (tests/ is on sys.path, as for conftest).

Tokenizer: llama.cpp's MiniCPM converter path only takes a SentencePiece tokenizer.model
(`MiniCPMModel.set_vocab` -> `_set_vocab_sentencepiece`, no BPE fallback), like the real checkpoints'
LlamaTokenizer. SmolLM2's BPE tokenizer (conftest) therefore cannot be used here; LLaMA's real
SentencePiece model is rebuilt from the pinned tree's models/ggml-vocab-llama-spm.gguf instead
(conftest.sentencepiece_model_from_gguf).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest

from conftest import sentencepiece_model_from_gguf

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "minicpm_remote"
REMOTE_CODE_FILES = ("configuration_minicpm.py", "modeling_minicpm.py")
AUTO_MAP = {"AutoConfig": "configuration_minicpm.MiniCPMConfig",
            "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM"}
# MiniCPM-1 sft's own chat template (its tokenizer_config.json); BOS comes from add_bos_token.
MINICPM_CHAT_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                         "{{'<用户>' + message['content'].strip() + '<AI>'}}{% else %}{{message['content'].strip()}}"
                         "{% endif %}{% endfor %}")
TINY_SCALES = dict(scale_emb=12, scale_depth=1.4, dim_model_base=32)  # real: 12, 1.4, 256 (hidden 1536/2304)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = "I have been feeling lonely since I moved to a new city. 最近工作压力很大。"


def make_tiny_minicpm(folder: Path, *, hidden_size: int = 256, num_hidden_layers: int = 2, seed: int = 0,
                      chat_template: str = MINICPM_CHAT_TEMPLATE) -> Path:
    """Write a random-weight MiniCPM-1 checkpoint folder as openbmb ships one: config.json (with
    auto_map and the MiniCPM keys, no rope_theta, no lm_head), the remote-code .py files,
    model.safetensors (embeddings tied, so no lm_head.weight), tokenizer.model + tokenizer_config.json
    (LlamaTokenizer, add_bos_token, chat template). hidden_size 256 (a multiple of 256) lets
    llama-quantize use K-quants; 4 heads of 64 and 2 KV heads (GQA, as MiniCPM-1B). Returns `folder`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorapipe.core import llamacpp

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(REMOTE_CODE_DIR / name, folder / name)
    sentencepiece_model_from_gguf(llamacpp.source_dir() / "models" / "ggml-vocab-llama-spm.gguf", folder / "tokenizer.model")
    config = {
        "architectures": ["MiniCPMForCausalLM"], "auto_map": AUTO_MAP, "model_type": "minicpm",
        "vocab_size": 32000, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_hidden_layers, "num_attention_heads": hidden_size // 64, "num_key_value_heads": max(1, hidden_size // 128),
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_scaling": None,
        "initializer_range": 0.1, "tie_word_embeddings": True, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, **TINY_SCALES,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "chat_template": chat_template,
    }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n", encoding="utf-8")

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=True), trust_remote_code=True)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


# ------------------------------------------------------------------------------------------ helpers
def _load(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    # trust_remote_code: AutoTokenizer also reads config.json (auto_map); left None it would prompt
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True)


def _folded_llama_reference(folder: Path):
    """MiniCPM's forward written independently of the remote code: an untied LlamaForCausalLM with the
    three scales folded into the weights (embeddings x scale_emb, o_proj / down_proj x residual scale,
    lm_head = embeddings / (hidden / dim_model_base))."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")
    ref = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in keys}, tie_word_embeddings=False)).eval()
    state = load_file(folder / "model.safetensors")
    emb = state["model.embed_tokens.weight"]
    residual = cfg["scale_depth"] / math.sqrt(cfg["num_hidden_layers"])
    with torch.no_grad():
        ref.load_state_dict(state, strict=False)
        ref.model.embed_tokens.weight.copy_(emb * cfg["scale_emb"])
        ref.lm_head.weight.copy_(emb / (cfg["hidden_size"] / cfg["dim_model_base"]))
        for layer in ref.model.layers:
            layer.self_attn.o_proj.weight.mul_(residual)
            layer.mlp.down_proj.weight.mul_(residual)
    return ref


def _hf_vs_gguf(folder: Path, gguf: Path, text: str = PROMPT) -> tuple[float, float, list[int]]:
    import torch

    from lorapipe.core import parity

    ids = _tokenizer(folder)(text)["input_ids"]
    with torch.no_grad():
        hf = _load(folder)(torch.tensor([ids])).logits[0].numpy()
    llm = parity.load_gguf(gguf, n_ctx=128)
    try:
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids  # HF and llama.cpp tokenize alike
        max_diff, agreement = parity.compare_logits(hf, parity.gguf_logits(llm, ids))
    finally:
        llm.close()
    return max_diff, agreement, ids


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in ("tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(src / name, dst / name)


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def minicpm_dir(tmp_path_factory) -> Path:
    return make_tiny_minicpm(tmp_path_factory.mktemp("tiny-minicpm") / "minicpm")


@pytest.fixture(scope="module")
def minicpm_merged(minicpm_dir, tmp_path_factory) -> tuple[Path, float]:
    """LoRA (all seven projections) trained 2 steps on packed rows, merged, saved: (folder, last loss)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lorapipe.core import sft

    tok = _tokenizer(minicpm_dir)
    texts = ["<用户>Hello, how are you?<AI>I am fine, thank you.", "<用户>我很难过。<AI>我在这里陪着你。", "<用户>Hi<AI>Hello!"]
    examples = [{"input_ids": tok(t)["input_ids"], "labels": tok(t)["input_ids"]} for t in texts]
    batch = sft.PackedCollator(max_len=256, pad_id=0)(examples)
    assert batch["input_ids"].shape[0] == 1  # one packed row, position_ids restarting at 0 per sample

    torch.manual_seed(0)
    base = _load(minicpm_dir)
    base.activation_checkpointing_enable({"use_reentrant": False})  # as train.gradient_checkpointing: checkpointed layers
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                            task_type="CAUSAL_LM"))
    wrapped = {n.split(".base_layer")[0].split(".")[-1] for n, _ in model.named_modules() if n.endswith(".base_layer")}
    assert wrapped == set(LORA_TARGETS)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    losses = []
    for _ in range(2):
        loss, n = sft.loss_sum(model, batch, supports_keep=True)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append((loss / n).item())
    assert all(math.isfinite(x) for x in losses) and losses[1] < losses[0]  # gradients reach the LoRA weights
    merged = model.merge_and_unload()
    out = tmp_path_factory.mktemp("minicpm-merged") / "merged"
    merged.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer_files(minicpm_dir, out)  # as the merge stage does: tokenizer files copied, not re-saved
    return out, losses[-1]


# ------------------------------------------------------------------------------------------ tests
def test_loads_only_with_trust_remote_code_and_generates(minicpm_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for loader in (AutoConfig, AutoModelForCausalLM):
        with pytest.raises(ValueError, match="minicpm|custom code|trust_remote_code"):
            loader.from_pretrained(minicpm_dir, trust_remote_code=False)

    model = _load(minicpm_dir)
    assert type(model).__name__ == "MiniCPMForCausalLM"
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's own code, not a transformers class
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert (model.config.scale_emb, model.config.scale_depth, model.config.dim_model_base) == (12, 1.4, 32)

    tok = _tokenizer(minicpm_dir)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id == 1
    with torch.no_grad():
        logits = model(ids).logits
        reference = _folded_llama_reference(minicpm_dir)(ids).logits  # the MiniCPM scalings, independently
        out = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.allclose(logits, reference, atol=1e-4), float((logits - reference).abs().max())
    assert out.shape == (1, ids.shape[1] + 6)
    # greedy generate with the KV cache continues exactly as a full forward would
    with torch.no_grad():
        full = model(out[:, :-1]).logits[0, ids.shape[1] - 1:].argmax(-1)
    assert full.tolist() == out[0, ids.shape[1]:].tolist()


def test_packed_rows_and_logits_to_keep(minicpm_dir):
    """Samples packed in one row (position_ids restarting at 0, no attention mask) give the logits
    they give alone, and a boolean logits_to_keep mask selects exactly those positions. (Without the
    block-diagonal mask the second sample would attend to the first: checked below too.)"""
    import torch

    model = _load(minicpm_dir)
    tok = _tokenizer(minicpm_dir)
    a, b = tok("Hello there, how are you?")["input_ids"], tok("我很难过。")["input_ids"]
    row = torch.tensor([a + b])
    pos = torch.tensor([list(range(len(a))) + list(range(len(b)))])
    keep = torch.zeros_like(row, dtype=torch.bool)
    keep[0, 1:len(a) - 1] = True
    keep[0, len(a) + 1:] = True
    with torch.no_grad():
        # use_cache=False as the trainer passes it: transformers reads packing only when there is no cache
        packed = model(row, position_ids=pos, use_cache=False).logits[0]
        alone = torch.cat([model(torch.tensor([a])).logits[0], model(torch.tensor([b])).logits[0]])
        kept = model(row, position_ids=pos, use_cache=False, logits_to_keep=keep).logits
        last = model(row, position_ids=pos, use_cache=False, logits_to_keep=1).logits
    assert torch.allclose(packed, alone, atol=1e-4), float((packed - alone).abs().max())
    with torch.no_grad():
        leaky = model(row, position_ids=pos).logits[0]  # a cache disables packing: plain causal mask
    assert not torch.allclose(leaky[len(a):], alone[len(a):], atol=1e-2)
    assert kept.shape == (int(keep.sum()), 32000) and torch.allclose(kept, packed[keep[0]], atol=1e-5)
    assert last.shape == (1, 1, 32000) and torch.allclose(last[0, 0], packed[-1], atol=1e-5)


def test_converter_minicpm_path_and_llama_cpp_logits_match(minicpm_dir, tmp_path):
    from lorapipe.core import gguf_meta
    from lorapipe.core.errors import LorapipeError
    from lorapipe.stages.convert import convert

    t0 = time.monotonic()
    with pytest.raises(LorapipeError, match="trust_remote_code"):  # the folder carries code: opt-in only
        convert(minicpm_dir, tmp_path / "model-f16.gguf", "f16", name="tiny-minicpm")
    result = convert(minicpm_dir, tmp_path / "model-f16.gguf", "f16", name="tiny-minicpm", trust_remote_code=True)
    r = gguf_meta.reader(tmp_path / "model-f16.gguf")
    meta = gguf_meta.metadata(r)
    names = {t.name for t in r.tensors}
    assert result["arch"] == meta["general.architecture"] == "minicpm"
    assert (result["bos_id"], result["eos_id"]) == (1, 2) and meta["tokenizer.ggml.model"] == "llama"
    assert meta["minicpm.embedding_scale"] == pytest.approx(12.0)
    assert meta["minicpm.residual_scale"] == pytest.approx(1.4 / math.sqrt(2))
    assert meta["minicpm.logit_scale"] == pytest.approx(256 / 32)
    assert meta["minicpm.attention.head_count_kv"] == 2
    assert "token_embd.weight" in names and "output.weight" not in names  # tied: llama.cpp reuses token_embd
    max_diff, agreement, ids = _hf_vs_gguf(minicpm_dir, tmp_path / "model-f16.gguf")
    print(f"\nPARITY minicpm (checkpoint config) f16: max|dlogit|={max_diff:.4g} argmax={agreement:.3f} "
          f"over {len(ids)} positions; convert+compare {time.monotonic() - t0:.1f}s")
    assert max_diff < 0.02 and agreement == 1.0


def test_lora_merge_reloads_with_remote_code_and_converts(minicpm_dir, minicpm_merged, tmp_path):
    import torch

    from lorapipe.stages.convert import convert

    merged, loss = minicpm_merged
    assert math.isfinite(loss)
    for name in REMOTE_CODE_FILES:  # save_pretrained copies the remote code of an auto_map model
        assert (merged / name).read_text() == (REMOTE_CODE_DIR / name).read_text()
    config = json.loads((merged / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == AUTO_MAP["AutoModelForCausalLM"]
    assert config["architectures"] == ["MiniCPMForCausalLM"] and config["model_type"] == "minicpm"
    assert (config["scale_emb"], config["scale_depth"], config["dim_model_base"]) == (12, 1.4, 32)

    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=False)
    ids = torch.tensor([_tokenizer(merged)(PROMPT)["input_ids"]])
    with torch.no_grad():
        after, before = _load(merged)(ids).logits, _load(minicpm_dir)(ids).logits
    assert not torch.allclose(after, before, atol=1e-3)  # the LoRA delta was merged in

    convert(merged, tmp_path / "merged-f16.gguf", "f16", name="tiny-minicpm-merged", trust_remote_code=True)
    max_diff, agreement, n = _hf_vs_gguf(merged, tmp_path / "merged-f16.gguf")
    print(f"\nPARITY minicpm (merged, transformers-5 config) f16: max|dlogit|={max_diff:.4g} argmax={agreement:.3f}")
    assert max_diff < 0.02 and agreement == 1.0
