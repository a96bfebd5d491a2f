"""The pairwise masks of secure aggregation: keystreams that both ranks of a pair draw alike.

``mask_stream(prg, secret, round_index, device)`` gives one pair's masks for one round: AES-128 in counter
mode (cryptographic, made on the host) or torch's generator on the device (statistical). See
:mod:`fedsim.privacy.secagg`.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedsim.privacy.fixedpoint import MODULUS

HOST_CHUNK = 1 << 18  # elements per chunk on the host: 1 MiB float32, so the passes stay in cache
TORCH_CHUNK = 1 << 22  # elements per chunk of the torch engine (CUDA tensors) with AES masks
DEVICE_BLOCK = 1 << 20  # elements per reseeded block of the "device" PRG (its chunk size too)
CHECK_ELEMENTS = 4096  # masks compared at construction


def mask_stream(prg: str, secret: bytes, round_index: int, device: torch.device):
    cls = AesStream if prg == "aes" else DeviceStream
    return cls(secret, round_index, torch.device(device))


class AesStream:
    """Masks of one pair and round: an AES-128 counter-mode keystream as uint32, keyed by the pair secret.

    The counter block is (round index, 64 bits) || (32 zero bits) || (block number + 2, 32 bits), i.e.
    AES-GCM's counter mode with the round as IV: the keystream is taken from OpenSSL's GCM encryption of
    zeros (the tag is discarded), whose VAES code is about twice as fast as its plain CTR here. Streams of
    different rounds never overlap, and the stream is the same however it is cut into chunks.
    """

    _zeros = np.zeros(4 * max(HOST_CHUNK, TORCH_CHUNK, DEVICE_BLOCK, CHECK_ELEMENTS), np.uint8)

    def __init__(self, secret: bytes, round_index: int, device: torch.device):
        nonce = round_index.to_bytes(8, "big") + bytes(4)
        self._encryptor = Cipher(algorithms.AES(secret[:16]), modes.GCM(nonce)).encryptor()
        self._device = device
        self._pinned: torch.Tensor | None = None

    def take_host(self, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """The next ``n`` masks as uint32, written into ``out`` (``n`` first elements) when given."""
        out = np.empty(n, np.uint32) if out is None else out[:n]
        self._encryptor.update_into(self._zeros[: 4 * n], out.view(np.uint8))
        return out

    def take_torch(self, n: int) -> torch.Tensor:
        """The next ``n`` masks as int32 bit patterns on the device (added into int64, reduced modulo 2^32)."""
        device = self._device
        if device.type == "cpu":
            return torch.from_numpy(self.take_host(n).view(np.int32))
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(max(n, TORCH_CHUNK), dtype=torch.int32, pin_memory=True)
        host = self._pinned[:n]
        self.take_host(n, host.numpy().view(np.uint32))
        return host.to(device)  # blocking: the pinned buffer is reused next chunk


class DeviceStream:
    """Masks of one pair and round from ``torch.randint`` on ``device``, reseeded every ``DEVICE_BLOCK``
    elements with BLAKE2b(secret, round, block) so that every block is drawn the same way on both ranks."""

    def __init__(self, secret: bytes, round_index: int, device: torch.device):
        self._secret = secret[16:]
        self._round = round_index.to_bytes(8, "big")
        self._device = torch.device(device)
        self._generator = torch.Generator(device=self._device)
        self._block = 0
        self._buffer: torch.Tensor | None = None
        self._used = 0

    def _next_block(self) -> None:
        digest = hashlib.blake2b(self._secret + self._round + self._block.to_bytes(8, "big"), digest_size=8)
        self._generator.manual_seed(int.from_bytes(digest.digest(), "big"))
        self._buffer = torch.randint(
            0, MODULUS, (DEVICE_BLOCK,), generator=self._generator, dtype=torch.int64, device=self._device
        )
        self._block += 1
        self._used = 0

    def take_torch(self, n: int) -> torch.Tensor:
        """The next ``n`` masks as int64 in ``[0, 2^32)`` on the device."""
        parts = []
        while n:
            if self._buffer is None or self._used == DEVICE_BLOCK:
                self._next_block()
            take = min(n, DEVICE_BLOCK - self._used)
            parts.append(self._buffer[self._used : self._used + take])
            self._used += take
            n -= take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def take_host(self, n: int, out: np.ndarray | None = None) -> np.ndarray:
        """The next ``n`` masks as uint32 (CPU generator only)."""
        values = self.take_torch(n).numpy()
        out = np.empty(n, np.uint32) if out is None else out[:n]
        np.copyto(out, values, casting="unsafe")  # values in [0, 2^32): exact
        return out
