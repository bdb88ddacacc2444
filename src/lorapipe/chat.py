"""`lorapipe chat`: talk to the pipeline's model in the terminal.

Two backends over the pipeline's outputs:
  gguf (default)  the quantized GGUF (models/gguf/model-quant.gguf) through llama.cpp, via
                  llama-cpp-python's bindings over our pinned build. The prompt is the GGUF's own chat
                  template (metadata `tokenizer.chat_template`), rendered by llama-cpp-python's
                  Jinja2ChatFormatter: the same sandboxed jinja2 set-up transformers uses.
  hf              the merged model (models/merged/) through transformers, streamed with
                  TextIteratorStreamer; the template is the tokenizer's.

Tokens stream as they are generated. A reply ends at EOS or the template's end-of-turn token, and
special tokens are never printed. In the session: /reset, /system <text>, /exit (or Ctrl-D); Ctrl-C
stops the reply being generated, not the session. `--prompt TEXT` answers once and exits, printing
only the answer (for scripts).
"""

from __future__ import annotations

import argparse
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pydantic import ValidationError

from lorapipe.core import paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.gguf_file import check_gguf
from lorapipe.core.hfmodel import check_folder, load_causal_lm, load_tokenizer, stop_token_ids
from lorapipe.core.templates import END_OF_TURN_TOKENS

HELP = "chat with the model in the terminal (quantized GGUF via llama.cpp, or the merged HF model)"

# Sampling defaults for top-k/min-p are transformers' (and LLaMA-Factory chat's): top_k 50, no min_p.
# llama-cpp-python's own defaults (top_k 40, min_p 0.05) would make the two backends sample differently.
TOP_K = 50


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=("gguf", "hf"), default=None,
                        help="gguf: quantized GGUF through llama.cpp; hf: merged model through transformers "
                             "(default: chat.backend)")
    parser.add_argument("--model", default=None,
                        help="a GGUF file (gguf backend) or an HF model folder (hf backend); default: "
                             "models/gguf/model-quant.gguf or models/merged")
    parser.add_argument("--system", default=None, help="system prompt (default: chat.system, else the template's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="most tokens per reply (default: chat.max_new_tokens)")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: chat.temperature)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: chat.top_p)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="(default: chat.repetition_penalty)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    parser.add_argument("--prompt", default=None,
                        help="one-shot: answer this prompt ('-' reads it from stdin), print only the answer, exit")


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float
    seed: int | None = None


# ------------------------------------------------------------------------------------ backends
class GGUFBackend:
    """A GGUF model loaded by llama.cpp (llama-cpp-python bindings over the pinned build)."""

    def __init__(self, path: str | Path, *, ctx: int, threads: int | None = None, seed: int | None = None):
        self.path = check_gguf(path, "pass --model, or build it with `dvc repro`")
        from lorapipe.core.llamacpp import LlamaCppMissing, use_shared_libs

        try:
            use_shared_libs()
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except (LlamaCppMissing, OSError, FileNotFoundError) as exc:
            raise LorapipeError(f"llama.cpp bindings unavailable: {exc} (run `make setup`)") from None

        kwargs = dict(model_path=str(self.path), n_ctx=ctx, verbose=False)
        if threads:
            kwargs["n_threads"] = threads
        if seed is not None:
            kwargs["seed"] = seed
        try:
            self.llm = llama_cpp.Llama(**kwargs)
        except ValueError as exc:  # llama.cpp could not load it (corrupt or unsupported architecture)
            raise LorapipeError(f"{self.path}: llama.cpp failed to load the model ({exc})") from None
        template = self.llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise LorapipeError(f"{self.path}: GGUF has no chat template (metadata tokenizer.chat_template); "
                                "convert a model folder that has one (chat_template.jinja)")
        bos, eos = self._token_text(self.llm.token_bos()), self._token_text(self.llm.token_eos())
        self.formatter = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        # llama.cpp stops on every end-of-generation token of the vocab by itself; the marker strings
        # are a second guard for a GGUF whose end-of-turn token was not typed CONTROL (it would then
        # come out as text pieces). create_completion holds back partial matches while streaming.
        self.stops = [t for t in dict.fromkeys([eos, *END_OF_TURN_TOKENS]) if t and t in template]
        # Never run past the context the model was trained with (llama.cpp would only warn).
        trained = llama_cpp.llama_model_n_ctx_train(self.llm.model)
        self.ctx = min(self.llm.n_ctx(), trained) if trained > 0 else self.llm.n_ctx()

    def _token_text(self, token_id: int) -> str:
        if token_id is None or token_id < 0:
            return ""
        return self.llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def stream(self, messages: list[dict], s: Sampling) -> Iterator[str]:
        prompt = self.formatter(messages=messages).prompt
        # Like transformers' apply_chat_template: the rendered template carries BOS itself when the
        # model wants one, so no BOS is added here (SmolLM2's BOS is <|im_start|>: it would double).
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        room = self.ctx - len(tokens)
        if room <= 0:
            raise LorapipeError(f"the conversation ({len(tokens)} tokens) fills the context window "
                                f"({self.ctx} tokens: chat.ctx or the model's training context); /reset to start over")
        chunks = self.llm.create_completion(
            tokens, max_tokens=min(s.max_new_tokens, room), temperature=s.temperature, top_p=s.top_p,
            top_k=TOP_K, min_p=0.0, repeat_penalty=s.repetition_penalty, stop=self.stops, seed=s.seed, stream=True)
        try:
            for chunk in chunks:
                text = chunk["choices"][0]["text"]
                if text:
                    yield text
        finally:
            chunks.close()


class HFBackend:
    """An HF model folder (the merged model) through transformers' generate + TextIteratorStreamer."""

    def __init__(self, folder: str | Path, *, trust_remote_code: bool = False, seed: int | None = None):
        self.folder = check_folder(folder, "the HF model (pass --model, or build models/merged with `dvc repro`)")
        import torch

        self.torch = torch
        self.tok = load_tokenizer(self.folder, trust_remote_code)
        if not self.tok.chat_template:
            raise LorapipeError(f"{self.folder}: no chat template (neither chat_template.jinja nor a 'chat_template' "
                                "in tokenizer_config.json); chat needs the template the model was trained with")
        self.model = load_causal_lm(self.folder, trust_remote_code).eval()
        ids = stop_token_ids(self.tok)
        gen_eos = self.model.generation_config.eos_token_id
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
        if not ids:
            raise LorapipeError(f"{self.folder}: tokenizer has no EOS token and the template no known end-of-turn "
                                "token; generation could never stop")
        self.stop_ids = ids
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else ids[0]
        if seed is not None:
            torch.manual_seed(seed)

    def stream(self, messages: list[dict], s: Sampling) -> Iterator[str]:
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The template carries BOS where the model wants one (apply_chat_template(tokenize=True) also
        # tokenizes without adding special tokens).
        enc = self.tok(text, add_special_tokens=False, return_tensors="pt")
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()

        class _StopOnEvent(StoppingCriteria):  # lets Ctrl-C in the main thread end generate()
            def __call__(self, input_ids, scores, **kwargs):
                return stop.is_set()

        kwargs = dict(enc, max_new_tokens=s.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                      repetition_penalty=s.repetition_penalty, streamer=streamer,
                      stopping_criteria=StoppingCriteriaList([_StopOnEvent()]))
        if s.temperature > 0:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=TOP_K)
        else:  # greedy; unset the sampling knobs a generation_config may carry so none warns
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        errors: list[BaseException] = []

        def generate():
            try:
                with self.torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # re-raised in the caller's thread; end the stream so it does not hang
                errors.append(exc)
                streamer.on_finalized_text("", stream_end=True)

        worker = threading.Thread(target=generate, name="lorapipe-chat-generate", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            stop.set()
            worker.join()
        if errors:
            raise errors[0]


# ------------------------------------------------------------------------------------- session
class Conversation:
    """The messages so far and the system prompt; a partial (interrupted) reply is kept as said."""

    def __init__(self, system: str | None = None):
        self.system = system
        self.turns: list[dict] = []

    def messages_for(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": user}]

    def add(self, user: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.turns = []


def reply(backend, messages: list[dict], sampling: Sampling, out=None) -> tuple[str, bool]:
    """Stream one reply to `out` (default: the current sys.stdout); return (text, interrupted).
    Ctrl-C ends the reply only."""
    out = out or sys.stdout
    pieces: list[str] = []
    try:
        for piece in backend.stream(messages, sampling):
            pieces.append(piece)
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        return "".join(pieces), True
    return "".join(pieces), False


def interactive(backend, conv: Conversation, sampling: Sampling, label: str) -> int:
    err = sys.stderr
    print(f"lorapipe chat · {label}\ncommands: /reset  /system <text>  /exit   (Ctrl-C stops a reply, Ctrl-D leaves)",
          file=err, flush=True)
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print(file=err)
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to leave)", file=err, flush=True)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            conv.reset()
            print("(conversation cleared)", file=err, flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            conv.system = text[len("/system"):].strip() or None
            print(f"(system prompt {'set' if conv.system else 'cleared: the template default applies'}; "
                  "/reset to start over with it)", file=err, flush=True)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; commands: /reset /system <text> /exit)", file=err, flush=True)
            continue
        sys.stdout.write("bot> ")
        answer, interrupted = reply(backend, conv.messages_for(text), sampling)
        if interrupted:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        conv.add(text, answer)


# ---------------------------------------------------------------------------------------- main
def _load_params(path: str):
    from lorapipe import params as params_mod

    # Outside a lorapipe checkout (chatting with any --model) the defaults apply.
    if path == "params.yaml" and not Path(path).is_file():
        return params_mod.Params()
    return params_mod.load(path)


def _settings(args, chat_params):
    """chat params with the command-line overrides, validated by the same pydantic rules."""
    from lorapipe.params import ChatParams

    flags = {"backend": args.backend, "system": args.system, "max_new_tokens": args.max_new_tokens,
             "temperature": args.temperature, "top_p": args.top_p, "repetition_penalty": args.repetition_penalty}
    merged = {**chat_params.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
    try:
        return ChatParams.model_validate(merged)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise LorapipeError(f"--{str(e['loc'][0]).replace('_', '-')}: {e['msg']}") from None


def load_backend(backend: str, model: str | None, params, seed: int | None):
    if backend == "gguf":
        path = model or paths.QUANT_GGUF
        chat = params.chat
        return GGUFBackend(path, ctx=chat.ctx, threads=chat.threads, seed=seed), str(path)
    folder = model or paths.MERGED_DIR
    if Path(folder).is_file():
        raise LorapipeError(f"{folder}: the hf backend needs an HF model folder (for a GGUF use --backend gguf)")
    return HFBackend(folder, trust_remote_code=params.model.trust_remote_code, seed=seed), str(folder)


def main(args: argparse.Namespace) -> int:
    params = _load_params(args.params)
    chat = _settings(args, params.chat)
    sampling = Sampling(chat.max_new_tokens, chat.temperature, chat.top_p, chat.repetition_penalty, args.seed)
    backend, where = load_backend(chat.backend, args.model, params, args.seed)
    conv = Conversation(chat.system)
    if args.prompt is not None:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if not prompt.strip():
            raise LorapipeError("--prompt: empty prompt")
        _, interrupted = reply(backend, conv.messages_for(prompt.strip()), sampling)
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 130 if interrupted else 0
    return interactive(backend, conv, sampling, f"{chat.backend} backend · {where}")
