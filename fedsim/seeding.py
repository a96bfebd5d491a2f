"""Every random draw derives from (seed, round, client, purpose) — never the world size or the clock.

So a client's data order, augmentation and MixUp in round r are the same in a
fresh run, a resumed run and a run with a different number of ranks.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, round_index: int, client: int, purpose: str) -> int:
    """A 63-bit seed from the run seed, the round, the client index and a purpose label."""
    entropy = [seed, round_index + 1, client + 1, zlib.crc32(purpose.encode())]
    high, low = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(high) << 31) ^ int(low)


def generator(seed: int, round_index: int, client: int, purpose: str) -> torch.Generator:
    """A CPU torch generator seeded from :func:`derive_seed`."""
    return torch.Generator().manual_seed(derive_seed(seed, round_index, client, purpose))
