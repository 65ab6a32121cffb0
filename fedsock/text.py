"""Text as token ids without a shared vocabulary.

Clients cannot pool their words to agree on a vocabulary (that would share their text), so a
word's id is a hash of the word itself, the same on every client and the server: lower-cased
words (runs of letters, digits and the apostrophe; a few symbols, such as currency signs and
'!', are words of their own), each mapped to 1 + CRC-32(word) mod (buckets - 1); 0 pads. A
message becomes `max_tokens` ids, as the spam tool did: cut at the right, padded at the left.
Collisions are rare with 32,768 buckets (a few hundred distinct words in a typical set), and
the model learns around them. CRC-32 (zlib) is fast, and stable across processes and
platforms, which Python's own `hash` of a string is not.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

WORD = re.compile(r"[a-z0-9']+|[£$€!?%&]")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def token_ids(text: str, max_tokens: int, buckets: int) -> np.ndarray:
    """The message's first `max_tokens` words as hashed ids, left-padded with 0 to `max_tokens`."""
    ids = [1 + zlib.crc32(word.encode("utf-8")) % (buckets - 1) for word in words(text)[:max_tokens]]
    out = np.zeros(max_tokens, dtype=np.int64)
    if ids:
        out[max_tokens - len(ids):] = ids
    return out


def encode_texts(texts: list[str], max_tokens: int, buckets: int) -> np.ndarray:
    return np.stack([token_ids(t, max_tokens, buckets) for t in texts]) if texts else np.zeros((0, max_tokens), np.int64)
