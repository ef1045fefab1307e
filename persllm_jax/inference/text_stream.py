"""Incremental detokenization for streaming: text is emitted only once no later token can change
it, and a row stops where a stop string appears.

Each token decodes only a short window of the latest ids (from `prefix` on): the window's text
minus the text of its already-read part is the new text, accepted once it no longer ends in an
unfinished character (U+FFFD). Work per token stays constant however long the reply grows.
"""

from __future__ import annotations


class TextStream:
    """Incremental detokenization of one row: emits only text that can no longer change."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        # A stop string may be forming at the end of the text: hold that many characters back.
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.prefix = 0  # window start: decoding from here gives the same text as from the start
        self.read = 0  # ids before this are in `text`
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> None:
        if self.stopped:
            return
        self.ids.append(token)
        known = self._decode(self.ids[self.prefix : self.read])
        window = self._decode(self.ids[self.prefix :])
        if len(window) <= len(known) or window.endswith("\ufffd"):
            return  # an unfinished character, or a token with no text yet: wait for more
        searched_from = max(0, len(self.text) - self.longest_stop)
        self.text += window[len(known) :]
        self.prefix, self.read = self.read, len(self.ids)
        for s in self.stop:
            cut = self.text.find(s, searched_from)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True

    def delta(self, final: bool) -> str:
        end = len(self.text)
        if final and not self.stopped and self.read < len(self.ids):
            # the reply ended inside a character: what the full decode shows for it
            self.text += self._decode(self.ids[self.prefix :])[
                len(self._decode(self.ids[self.prefix : self.read])) :
            ]
            self.read = len(self.ids)
            end = len(self.text)
        if not final:
            end -= self.hold
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted : end], end
        return out
