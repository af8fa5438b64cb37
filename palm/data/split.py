"""The held-out split of the data stages: a document's side is fixed by its SHA-1 and a seed, so
it does not depend on corpus order, on how the work is cut up, or on the other documents."""

from __future__ import annotations

import hashlib


def split_score(sha1: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document's hash and the seed."""
    return int(hashlib.sha256(f"{seed}:{sha1}".encode()).hexdigest()[:16], 16) / 2**64
