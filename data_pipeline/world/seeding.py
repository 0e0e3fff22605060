"""Named random streams: every random choice in the world comes from a stream keyed by its purpose.

Keying a stream by (seed, purpose, item) rather than drawing from one shared generator makes each
item's randomness independent of the order items are processed in, so work can be split across
processes without changing the output. String seeds are hashed with SHA-512 by `random.Random`,
which is stable across platforms and Python versions.
"""

from __future__ import annotations

import random


def derive_rng(seed: int, *purpose: object) -> random.Random:
    return random.Random(":".join(str(part) for part in (seed, *purpose)))
