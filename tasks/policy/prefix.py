"""Prefix bookkeeping shared by backends: which earlier prompt a new prompt extends.

The engine renders a child's prompt as its parent's prompt plus one step, and only hands backends text.
`PrefixIndex` finds the longest earlier prompt that the new one starts with, checking only at step
boundaries (after each stop string/separator), so a lookup costs one hash per step, not per character.
Backends use it to extend the parent's token IDs instead of re-tokenising (vLLM offline, transformers),
and the stand-in server uses it to report `cached_tokens` the way a prefix-caching server would.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Generic, Sequence, TypeVar

V = TypeVar("V")


def _h(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def boundary_cuts(text: str, boundaries: Sequence[str]) -> list[int]:
    """Positions right after each occurrence of a boundary in `text`, ascending, excluding its end."""
    cuts: set[int] = set()
    for b in boundaries:
        i = text.find(b) if b else -1
        while i >= 0:
            end = i + len(b)
            if end < len(text):
                cuts.add(end)
            i = text.find(b, i + 1)
    return sorted(cuts)


def adds_special_tokens(tokenizer: Any, text: str, override: bool | None = None) -> bool:
    """Whether encoding `text` (a whole prompt, or its first piece) should add the tokenizer's special
    tokens: `override` when set, else yes unless the text already starts with the BOS string (a chat
    template's `{{ bos_token }}`), as HF's apply_chat_template does, so a prompt never gets two."""
    if override is not None:
        return override
    bos = getattr(tokenizer, "bos_token", None)
    return not (isinstance(bos, str) and bos and text.startswith(bos))


class BoundaryEncoder:
    """Token IDs of a prompt as the concatenation of its pieces' IDs, the text cut right after every step
    boundary (the segmenter's stop strings). A pure function of the text, so equal prompts always get equal
    IDs, and a prompt that extends another by whole steps extends its IDs. Pieces are memoised: siblings
    share all but their last step. (The HTTP backend's token-ID prompts.)"""

    def __init__(self, tokenizer: Any, boundaries: Sequence[str], *, add_special_tokens: bool | None = None,
                 max_pieces: int = 100_000) -> None:
        self.tokenizer = tokenizer
        self._boundaries = tuple(b for b in boundaries if b)
        self._add = add_special_tokens
        self._pieces: dict[tuple[str, bool], tuple[int, ...]] = {}
        self._max = max_pieces

    def _encode_piece(self, piece: str, first: bool) -> tuple[int, ...]:
        key = (piece, first)
        ids = self._pieces.get(key)
        if ids is None:
            add = adds_special_tokens(self.tokenizer, piece, self._add) if first else False
            ids = tuple(self.tokenizer.encode(piece, add_special_tokens=add))
            if len(self._pieces) >= self._max:
                self._pieces.clear()
            self._pieces[key] = ids
        return ids

    def encode(self, text: str) -> tuple[int, ...]:
        edges = [0, *boundary_cuts(text, self._boundaries), len(text)]
        out: list[int] = []
        for i, (a, b) in enumerate(zip(edges, edges[1:])):
            out.extend(self._encode_piece(text[a:b], i == 0))
        return tuple(out)


class PrefixIndex(Generic[V]):
    """An LRU map from prompt text to a value (token IDs, a token count), searchable by longest prefix."""

    def __init__(self, boundaries: Sequence[str] = ("\n",), max_entries: int = 200_000) -> None:
        self._boundaries = tuple(b for b in boundaries if b)
        self._max = max_entries
        self._map: OrderedDict[bytes, V] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def put(self, text: str, value: V) -> None:
        key = _h(text)
        self._map[key] = value
        self._map.move_to_end(key)
        while len(self._map) > self._max:
            self._map.popitem(last=False)

    def get(self, text: str) -> V | None:
        return self._map.get(_h(text))

    def longest_prefix(self, text: str, *, proper: bool = False) -> tuple[int, V] | None:
        """(length, value) of the longest stored prompt that `text` starts with; `proper` excludes `text`."""
        if not proper:
            hit = self._map.get(_h(text))
            if hit is not None:
                return len(text), hit
        for end in reversed(boundary_cuts(text, self._boundaries)):
            hit = self._map.get(_h(text[:end]))
            if hit is not None:
                return end, hit
        return None

