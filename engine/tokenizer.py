"""The model folder's tokenizer (tokenizer.json, through Hugging Face `tokenizers`), if it has one."""
from __future__ import annotations

import json
from pathlib import Path

from metalforge.errors import MetalforgeError


class Tokenizer:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer   # only when a model folder has a tokenizer
        try:
            self.inner = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise MetalforgeError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
        self.eos_ids: set[int] = set()
        config = path.parent / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos and self.inner.token_to_id(eos) is not None:
                self.eos_ids.add(self.inner.token_to_id(eos))

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids)


class StreamingDetokenizer:
    """Text as tokens arrive, a few tokens decoded per step instead of the whole output again
    (which made streaming quadratic). The window starts one token before the newest complete
    text, since decoding can depend on the token before (leading spaces); a token that ends
    inside a UTF-8 character decodes to U+FFFD and waits for the rest (a character the output
    never completes is not emitted)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix = 0    # the window's first token
        self.read = 0      # tokens before this are emitted

    def add(self, token: int) -> str:
        self.tokens.append(token)
        done = self.tokenizer.decode(self.tokens[self.prefix:self.read])
        text = self.tokenizer.decode(self.tokens[self.prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.tokens)
            return text[len(done):]
        return ""


def load(folder) -> Tokenizer | None:
    path = Path(folder) / "tokenizer.json"
    return Tokenizer(path) if path.is_file() else None
