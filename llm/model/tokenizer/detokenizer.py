"""Streaming detokenization: token ids in, text deltas out."""

from __future__ import annotations

from collections.abc import Callable


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas, for streaming generation.

    Each :meth:`add` decodes only a short window of recent ids (the prefix-offset / read-offset
    technique): ids before ``prefix`` are final, ids in ``[prefix, read)`` were emitted and give
    context, ids from ``read`` on are new. A delta is emitted only when the new text grew and does
    not end in U+FFFD (a character cut between byte tokens), so concatenated deltas equal
    ``decode(all ids)``. Call :meth:`flush` once at the end of the stream.
    """

    def __init__(self, decode: Callable[..., str], *, skip_special_tokens: bool = True) -> None:
        self._decode = decode
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._prefix_text: str | None = ""
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append one token id; return the newly completed text (may be empty)."""
        self._ids.append(int(token_id))
        try:
            return self._emit(final=False)
        except Exception:
            self._ids.pop()  # e.g. an id outside the vocabulary: leave the stream as it was
            raise

    def flush(self) -> str:
        """Return whatever text is still held back (e.g. an incomplete character)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(
                self._ids[self._prefix : self._read], skip_special_tokens=self._skip
            )
        new_text = self._decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        if len(new_text) <= len(self._prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        delta = new_text[len(self._prefix_text) :]
        self._prefix, self._read, self._prefix_text = self._read, len(self._ids), None
        self.text += delta
        return delta
