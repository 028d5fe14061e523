"""OpenAI's ``stop``: the reply ends just before the first stop string, which is not included.

Applied to the reply text. :func:`cut` does a whole reply; a :class:`StopScanner` does a
stream piece by piece and holds back only text that could still turn out to be the start of a
stop string, so a stream never shows text past a stop and its pieces concatenate to what
:func:`cut` gives for the whole text.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_STOPS = 4  # as OpenAI
MAX_STOP_CHARS = 1000  # bounds the per-piece scan; stop strings are short in practice


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Where the stop string that is complete first (earliest end, then earliest start) begins in ``text[start:]``.

    "Complete first" is what a generator producing ``text`` left to right would stop on: with
    stops ``["abcd", "bc"]``, ``"abcd"`` is cut at ``"bc"``.
    """
    found = [(i + len(s), i) for s in stops if (i := text.find(s, start)) >= 0]
    return min(found)[1] if found else None


def cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to (not including) the first stop string, and whether one was found."""
    at = first_stop(text, stops)
    return (text, False) if at is None else (text[:at], True)


def held_back(text: str, start: int, stops: Sequence[str]) -> int:
    """Where the longest suffix of ``text[start:]`` that begins some stop string starts (``len(text)`` if none).

    Text from there on may still become a stop string once more text arrives.
    """
    longest = max((len(s) for s in stops), default=1)
    for at in range(max(start, len(text) - longest + 1), len(text)):
        tail = text[at:]
        if any(s.startswith(tail) for s in stops):
            return at
    return len(text)


class StopScanner:
    """Feed a stream's pieces; get back the text that may be shown and whether a stop string was reached."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = list(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.shown = 0  # characters of ``text`` already given out
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The new text that can be shown after ``piece`` (empty once stopped)."""
        if self.stopped:
            return ""
        self.text += piece
        if not self.stops:
            return self._show(len(self.text))
        # A stop string can only end in the new piece, so it starts at most ``longest - 1`` characters before it.
        at = first_stop(self.text, self.stops, max(0, len(self.text) - len(piece) - self.longest + 1))
        if at is not None:
            self.stopped = True
            return self._show(at)
        return self._show(held_back(self.text, self.shown, self.stops))

    def flush(self) -> str:
        """At the end of the reply: the text still held back (it never became a stop string)."""
        return "" if self.stopped else self._show(len(self.text))

    def _show(self, end: int) -> str:
        end = max(end, self.shown)
        piece, self.shown = self.text[self.shown : end], end
        return piece
