"""One request's answer as OpenAI shapes it: text released as tokens arrive with stop strings held
back and cut off (OpenAI never returns the stop sequence), a stop token's text dropped, log-
probabilities per token, the finish reason and the usage."""
from __future__ import annotations

from metalforge.engine.generation import Stats, Token
from metalforge.engine.scheduler import LONGEST

FINISH_REASONS = {"max_tokens": "length", LONGEST: "length", "stop token": "stop", "stop string": "stop"}


class Answer:
    def __init__(self, decode, stops: list[str], stop_ids: set[int]):
        self.decode, self.stops, self.stop_ids = decode, stops, stop_ids
        self.held = ""          # text that may be the start of a stop string
        self.cut = False        # a stop string was found: nothing more is released
        self.text = ""          # released so far
        self.logprobs: list[dict] = []

    def add(self, token: Token) -> tuple[str, list[dict]]:
        """The text this token releases and its log-probability entries (empty unless asked)."""
        entries = []
        if token.logprob is not None:
            entries = [dict(token=self.decode([token.id]), logprob=token.logprob,
                            top=[(self.decode([i]), lp) for i, lp in token.top_logprobs or ()])]
            self.logprobs += entries
        if self.cut or token.id in self.stop_ids:
            return "", entries
        self.held += token.text or ""
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held, self.cut = self.held[:min(found)], "", True
        else:
            keep = max((n for s in self.stops for n in range(min(len(s) - 1, len(self.held)), 0, -1)
                        if self.held.endswith(s[:n])), default=0)
            out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        self.text += out
        return out, entries

    def finish(self, stats: Stats) -> tuple[str, str]:
        """The held text the end releases (none after a stop string) and the finish reason."""
        out, self.held = ("" if self.cut else self.held), ""
        self.text += out
        return out, FINISH_REASONS.get(stats.stop_reason, "stop")


def usage(stats: Stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def _token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(entries: list[dict]) -> dict:
    """Chat's shape: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [{**_token(e["token"], e["logprob"]), "top_logprobs": [_token(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


def completion_logprobs(entries: list[dict], offset: int) -> dict:
    """Completions' shape: parallel lists, the text offset of each token counted from `offset`."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}
