"""Reading cache entries in training: the torch Dataset :class:`CachedPairs` and its collate function.

It only reads: an entry whose files differ from their digests cannot be
rebuilt from here (there are no records), so it is refused with
:class:`~data.cache.integrity.CorruptCache` naming the entry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data.cache.integrity import CorruptCache, entry_fault


class CachedPairs(torch.utils.data.Dataset):
    """Patch pairs of cached splits, as uint8 CHW tensors read from memory maps.

    ``__getitems__`` serves a whole batch with one fancy-index per array, so a
    DataLoader with ``batch_size`` set pays no per-sample Python overhead. The
    memory maps are opened lazily in each process: a DataLoader worker receives
    the folder names, not a copy of the arrays.
    """

    def __init__(self, folders: Sequence[Path]):
        """Open cached splits; each entry is checked against its digests once per process (not in workers).

        A folder without a DONE marker (arrays written by hand, as benchmarks
        do) is read as it is.

        Raises:
            CorruptCache: an entry's files differ from its digests; it cannot be rebuilt from here.
        """
        self.folders = [Path(f) for f in folders]
        self.meta: list[dict] = []
        self.offsets: list[int] = []
        self.counts: list[int] = []
        for part, folder in enumerate(self.folders):
            fault = entry_fault(folder)
            if fault:
                raise CorruptCache(folder, fault, ": delete it and build it again (train.py or python -m data.prepare)")
            info = json.loads((folder / "patches.json").read_text())
            self.offsets.append(len(self.meta))
            self.counts.append(info["count"])
            self.meta.extend({**m, "image": f"{folder.name}:{m['image']}", "part": part} for m in info["patches"])
        self.labels = torch.tensor([m["label"] for m in self.meta], dtype=torch.long)
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict:
        """What a DataLoader worker receives: folder names and metadata; it neither copies nor re-checks arrays."""
        state = dict(self.__dict__)
        state["_arrays"] = None  # reopened in the receiving process
        return state

    def arrays(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(context, detail) memory maps of every part, opened on first use."""
        if self._arrays is None:
            self._arrays = [
                (np.load(f / "context.npy", mmap_mode="r")[:n], np.load(f / "detail.npy", mmap_mode="r")[:n])
                for f, n in zip(self.folders, self.counts)
            ]
        return self._arrays

    def __len__(self) -> int:
        return len(self.meta)

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]):
        """A batch: (context uint8 (B,3,Hc,Wc), detail uint8 (B,3,Hd,Wd), labels, indices)."""
        idx = np.asarray(indices, dtype=np.int64)
        ctx, det = self._gather(idx)
        # NHWC memory viewed as NCHW: a free channels-last view, no copy.
        return (
            torch.from_numpy(ctx).permute(0, 3, 1, 2),
            torch.from_numpy(det).permute(0, 3, 1, 2),
            self.labels[idx],
            torch.from_numpy(idx),
        )

    def _gather(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        arrays = self.arrays()
        parts = np.searchsorted(np.asarray(self.offsets), idx, side="right") - 1
        first_c, first_d = arrays[0]
        out_c = np.empty((len(idx), *first_c.shape[1:]), np.uint8)
        out_d = np.empty((len(idx), *first_d.shape[1:]), np.uint8)
        for part in np.unique(parts):
            rows = np.flatnonzero(parts == part)
            local = idx[rows] - self.offsets[part]
            order = np.argsort(local, kind="stable")  # sorted reads are sequential on disk
            ctx, det = arrays[part]
            out_c[rows[order]], out_d[rows[order]] = ctx[local[order]], det[local[order]]
        return out_c, out_d


def collate_batch(batch):
    """Identity collate: ``__getitems__`` already returns a batch."""
    return batch
