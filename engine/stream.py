"""Incremental detokenization and stop strings: token ids in, finished text pieces out.

A byte-level tokenizer may split one UTF-8 character over several tokens, and a SentencePiece tokenizer
drops the leading space of the first token it decodes, so the text of a token depends on its neighbours.
`Detokenizer` therefore decodes a short window (the previous piece and the new tokens) and emits what the
new tokens add, holding it back while it ends in an incomplete character (U+FFFD). The pieces concatenate
to `tokenizer.decode(all_ids)`.

`StopStrings` sits after it: text that could be the start of a stop string is held back until it is
known not to be one, so a stop string (whole or partial) never reaches the output, even when it spans
several tokens.
"""

REPLACEMENT_CHAR = "\ufffd"


class Detokenizer:
    """Decodes the generated ids of one sequence piece by piece (special tokens skipped)."""

    def __init__(self, tokenizer, skip_special_tokens=True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = []
        self.prefix = 0  # the window starts here: the tokens of the last emitted piece, for context
        self.read = 0  # tokens before this are emitted

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; returns the text it completes ("" while a character is still incomplete)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """The text still held back (an incomplete character decodes to U+FFFD, as decode() does)."""
        before = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


class StopStrings:
    """Cuts the text stream at the first stop string; the stop string itself is never emitted."""

    def __init__(self, stop):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.stopped = False

    def _held(self, text):
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def feed(self, text: str) -> str:
        """Add text; returns what can be emitted now. Sets `stopped` when a stop string was found."""
        if self.stopped or not text:
            return ""
        if not self.stop:
            return text
        pending = self.pending + text
        hits = [i for i in (pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.pending = ""
            return pending[:min(hits)]
        keep = self._held(pending)
        self.pending = pending[len(pending) - keep:]
        return pending[:len(pending) - keep]

    def flush(self) -> str:
        """At the end of generation the held-back text was not a stop string after all."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class TextStream:
    """Detokenizer followed by stop strings: `add(token_id)` returns the next piece of visible text."""

    def __init__(self, tokenizer, stop=()):
        self.detok = Detokenizer(tokenizer)
        self.stops = StopStrings(stop)
        self.text = ""

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def add(self, token_id: int) -> str:
        piece = self.stops.feed(self.detok.add(token_id))
        self.text += piece
        return piece

    def finish(self) -> str:
        piece = "" if self.stopped else self.stops.feed(self.detok.flush())
        piece += self.stops.flush()
        self.text += piece
        return piece
