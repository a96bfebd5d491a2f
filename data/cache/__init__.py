"""A cache of masked, stain-normalized patch pairs, so epochs never decode a JPEG.

One folder per (hospital, split) holds ``context.npy`` (N,Sc,Sc,3) and
``detail.npy`` (N,Sd,Sd,3) uint8 arrays, read back as memory maps, plus
``patches.json`` (per patch: image, label, magnification, patient),
``skipped.json`` and a ``DONE`` marker written last. The folder name is a hash
of everything that shapes its content, so a change of setting never reuses a
stale cache; an entry is written in a temporary folder beside it and renamed
into place whole, so a folder without the marker is a build that never ended.

``DONE`` is the entry's manifest: the byte size and CRC-32 of every other
file, per 4 MiB block for the arrays. Opening an entry checks it once per
process; a changed, truncated or missing file makes it *corrupt*:
:func:`build_split` names it in a warning and rebuilds it, :class:`CachedPairs`
(which has no records to rebuild from) refuses it with :class:`CorruptCache`.

Modules:

* :mod:`~data.cache.spec`: what shapes and names an entry (:class:`CacheSpec`, :func:`split_folder`).
* :mod:`~data.cache.build`: building entries (:func:`build_split`, :func:`build_hospital`, :func:`fitted_normalizer`).
* :mod:`~data.cache.npy`: the ``.npy`` writer that takes the digests as it writes.
* :mod:`~data.cache.integrity`: the digests of ``DONE`` and the check against them (:class:`CorruptCache`).
* :mod:`~data.cache.dataset`: the torch Dataset that training reads (:class:`CachedPairs`, :func:`collate_batch`).
"""

from data.cache.build import build_hospital, build_split, fitted_normalizer
from data.cache.dataset import CachedPairs, collate_batch
from data.cache.integrity import DIGEST_BLOCK, CorruptCache
from data.cache.spec import CACHE_VERSION, CacheSpec, default_cache_root, split_folder, split_specs

__all__ = [
    "CACHE_VERSION",
    "DIGEST_BLOCK",
    "CacheSpec",
    "CachedPairs",
    "CorruptCache",
    "build_hospital",
    "build_split",
    "collate_batch",
    "default_cache_root",
    "fitted_normalizer",
    "split_folder",
    "split_specs",
]
