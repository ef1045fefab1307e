"""Incremental detokenization for streaming: text is emitted only once no later token can change
it, and a row stops where a stop string appears."""

from __future__ import annotations


class TextStream:
    """Incremental detokenization of one row: emits only text that can no longer change."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        # A stop string may be forming at the end of the text: hold that many characters back.
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            cut = self.text.find(s)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True

    def delta(self, final: bool) -> str:
        end = len(self.text)
        if not final:
            # An unfinished multi-byte character decodes to U+FFFD until its last byte arrives.
            end -= self.hold
            while end > self.emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : end], end
        return out
