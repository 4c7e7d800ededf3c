"""Fixed partitions of a split's ids: the same for every seed, process count and list order.

The convergence protocol (docs/protocol.md) holds a part of the train split out of training, to stop
training and choose weights and thresholds on it instead of on val. The part is decided by the ids
alone: the ids are ranked by the SHA-1 of their text and the first floor(fraction * n + 0.5) are held
out (at least one, and at least one left to train on).
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence


def id_digest(sample_id: str) -> str:
    """SHA-1 of the id's UTF-8 text (hex): a rank that does not depend on any seed or on the list order."""
    return hashlib.sha1(sample_id.encode("utf-8")).hexdigest()


def holdout_count(n: int, fraction: float) -> int:
    """How many of n ids a fraction holds out: round half up, at least 1 and at most n - 1 (0 for fraction 0)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return 0
    if n < 2:
        raise ValueError(f"holding out a part needs at least 2 ids, got {n}")
    return min(n - 1, max(1, math.floor(fraction * n + 0.5)))


def split_holdout(ids: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(kept, held out): the held-out ids are the holdout_count(n, fraction) ids with the smallest SHA-1.

    Both lists keep the order of `ids`. The partition depends only on the set of ids and the fraction,
    so the seeds of a comparison share it and any number of processes computes the same one.
    """
    k = holdout_count(len(ids), fraction)
    held = set(sorted(ids, key=lambda sid: (id_digest(sid), sid))[:k])
    return [sid for sid in ids if sid not in held], [sid for sid in ids if sid in held]
