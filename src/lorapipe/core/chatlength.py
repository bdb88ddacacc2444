"""Token length of a dialogue rendered with a model's chat template, and exact bounds that spare
most dialogues the rendering and counting (the clean stage's `max_tokens` filter)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorapipe.core.errors import LorapipeError

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")  # CJK ideographs (incl. ext. A, compatibility)
# Unicode White_Space, the set a tokenizer regex's \s means.
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
_WORD_GAP = re.compile(f"[{_WHITE_SPACE}]+")


class ChatLength:
    """Tokens of a dialogue rendered with the base model's chat template as training renders it
    (apply_chat_template), and bounds that spare most rows the rendering and counting. Reads only
    the tokenizer files of the model folder."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        if not (model_dir / "tokenizer.json").is_file():
            raise LorapipeError(f"{model_dir}/tokenizer.json not found: the clean stage needs the base model's fast tokenizer (run `lorapipe base` first)")
        from transformers import PreTrainedTokenizerFast  # heavy import, only when the stage runs

        tok = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
        if not tok.chat_template:
            raise LorapipeError(f"{model_dir}: the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
        self._tokenizer = tok
        self._backend = tok.backend_tokenizer
        self._normalizer = self._backend.normalizer
        self._overheads: dict[tuple[str, ...], int | None] = {}
        self._cjk: tuple[int, frozenset[str]] | None = None  # on first use (decodes the vocabulary)
        pre = json.loads(self._backend.to_str()).get("pre_tokenizer") or {}
        # Pre-tokenizers that never put two whitespace-separated words in one piece; an added
        # (special) token whose text holds whitespace could span two words, so none may.
        self._splits_words = (
            ((pre.get("type") == "ByteLevel" and pre.get("use_regex") is True)
             or pre.get("type") in ("Whitespace", "WhitespaceSplit", "BertPreTokenizer"))
            and not any(_WORD_GAP.search(t.content) for t in self._backend.get_added_tokens_decoder().values())
        )

    def render(self, messages: list[dict]) -> str:
        return self._tokenizer.apply_chat_template(messages, tokenize=False)

    def count(self, texts: list[str]) -> list[int]:
        """Token counts of rendered texts, in one batched call of the fast tokenizer."""
        return [len(e) for e in self._backend.encode_batch(texts, add_special_tokens=False)] if texts else []

    def _size(self, text: str) -> int:
        """UTF-8 bytes of `text` after the tokenizer's own normalizer (which may expand it)."""
        if self._normalizer is not None:
            text = self._normalizer.normalize_str(text)
        return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))

    def _overhead(self, roles: tuple[str, ...]) -> int | None:
        """Bytes the template adds around the contents of a dialogue with these roles, or None. Measured
        once per role sequence: rendered with every content "a", then "ab", a template that inserts
        each content once grows by one byte per message; any other (None) has its rows counted."""
        if roles not in self._overheads:
            n = len(roles)
            try:
                one = self._size(self.render([{"role": r, "content": "a"} for r in roles]))
                two = self._size(self.render([{"role": r, "content": "ab"} for r in roles]))
            except Exception:  # a template that rejects this shape: render real rows instead
                one, two = 0, -1
            self._overheads[roles] = one - n if two == one + n else None
        return self._overheads[roles]

    def upper_bound(self, roles: tuple[str, ...], contents: list[str]) -> int | None:
        """Tokens the rendered dialogue cannot exceed, found without rendering it (None: unknown).

        Every token of a BPE / WordPiece / Unigram model covers at least one byte of the normalised
        text (special tokens more); the only ones that cover nothing are SentencePiece prefix spaces
        ("▁"), at most one per segment between special tokens: 4 per message + 8 is generous.
        """
        overhead = self._overhead(roles)
        if overhead is None:
            return None
        # Without a normalizer the sizes add up: measured in one piece.
        size = self._size("".join(contents)) if self._normalizer is None else sum(map(self._size, contents))
        return overhead + size + 4 * len(contents) + 8

    def lower_bound(self, text: str) -> int:
        """Tokens the rendered `text` has at least, found without tokenizing it (a 1 MB paste is
        rejected without tokenizing it). Two floors: (1) when the pre-tokenizer splits at whitespace,
        no token spans two words: tokens >= words; (2) an ideograph that no vocabulary entry shares
        with another one needs a token of its own, and no token holds more than K ideographs:
        tokens >= lone ideographs + other ideographs / K."""
        n = 0
        ideographs = _CJK.findall(text)
        if ideographs:
            k, shared = self.cjk_profile()
            in_shared = sum(map(shared.__contains__, ideographs))
            n = len(ideographs) - in_shared + -(-in_shared // k)
        if self._splits_words:
            words = text.strip(_WHITE_SPACE)
            n = max(n, len(_WORD_GAP.split(words)) if words else 0)
        return n

    def cjk_profile(self) -> tuple[int, frozenset[str]]:
        """(K, shared): the most CJK ideographs any vocabulary entry holds, and the ideographs that
        some entry holds together with another one. Decodes the vocabulary once."""
        if self._cjk is None:
            most, shared = 1, set()
            for i in self._backend.get_vocab(with_added_tokens=True).values():
                ideographs = _CJK.findall(self._backend.decode([i], skip_special_tokens=False))
                if len(ideographs) >= 2:
                    most = max(most, len(ideographs))
                    shared.update(ideographs)
            self._cjk = (most, frozenset(shared))
        return self._cjk
