"""Secure aggregation inside the one all-reduce: pairwise masks that cancel in the sum.

The idea is Bonawitz et al.'s (*Practical Secure Aggregation for
Privacy-Preserving Machine Learning*, CCS 2017), without its dropout recovery:
every pair of ranks (i, j) agrees on a secret seed, and each rank adds to its
contribution, modulo 2^32, the pseudo-random mask ``+PRG(s_ij, round)`` for
every peer j > i and ``-PRG(s_ij, round)`` for every peer j < i. Each mask
appears once with each sign, so they cancel in the sum, while what leaves a rank
is uniformly distributed in Z_{2^32} to anyone who lacks one of its pair
secrets; so is every partial sum of a proper subset of ranks that the
collective's algorithm (a ring, a tree) passes around.

A round, on every rank of the group (:meth:`SecureAggregation.secure_sum_`):

1. **Quantize** the float32 contribution to fixed point: clip to
   ``[-clip, clip]`` and round to the grid of ``levels + 1`` points of step
   ``2·clip/levels``, i.e. to an integer ``q`` in ``[0, levels]``
   (``q = levels/2`` is exactly 0). Rounding is deterministic (to nearest,
   ties to even), so the aggregate is the same whatever the masks; stochastic
   rounding would make the quantization error unbiased in expectation but
   twice as large in the worst case, and needs a random draw per element. The
   grid is Flower's SecAgg+ (``quantize``: ``[0, quantization_range]``).
2. **Mask** ``q`` modulo 2^32 with the pairwise masks, in chunks that stay in
   cache.
3. **One** ``dist.all_reduce(SUM)`` over an int64 tensor: each element is in
   ``[0, 2^32)``, so the sum of W of them cannot overflow int64. (Or, with
   ``wire="int32"``, over the tensor's own memory as int32, relying on the
   backend's wrapping int32 sum: half the bytes, see :class:`SecureAggregation`.)
4. Reduce the sum modulo 2^32 (the masks are gone), remove the W zero points
   and **dequantize** into the caller's float32 tensor, in place.

Since the sum of the quantized values stays below ``W·levels < 2^32`` (checked),
the modular sum is the exact integer sum, and the result differs from the plain
sum only by quantization: at most ``W·clip/levels`` per element with the
default parameters (:func:`max_abs_error` gives the exact worst case for any).
Values outside ``[-clip, clip]`` are clipped and NaN enters as 0; both are
counted (:attr:`SecureAggregation.last_clipped`, :attr:`~SecureAggregation.last_nan`),
since clipping silently biases the mean.

Keys. At construction each rank draws an X25519 key pair and the *public* keys
are exchanged with one ``all_gather_object``; each pair derives the same
X25519 shared secret, expanded with HKDF-SHA256 (bound to both public keys and
both ranks) into the pair's 256-bit secret ``s_ij``. Private keys and secrets
never leave the rank. A second ``all_gather_object`` compares, pair by pair, a
hash of a mask drawn for a reserved round, so a key or PRG disagreement fails at
construction instead of silently corrupting every sum.

PRGs (``prg=``):

- ``"aes"`` (default): AES-128 in counter mode keyed by ``s_ij``, nonce = round
  index, i.e. a cryptographic, counter-based PRG whatever the chunking; its
  keystream is made on the host (OpenSSL's AES-GCM code, VAES/AES-NI) and, for
  CUDA tensors, copied to the device chunk by chunk.
- ``"device"``: ``torch.randint`` with a ``torch.Generator`` on the tensor's
  device (Philox on CUDA, Mersenne Twister on CPU), reseeded every 2^20 elements
  from ``BLAKE2b(s_ij, round, block)``: masks never leave the GPU, but these
  generators are statistical, not cryptographic (an observer who could invert
  them from the masked values would learn a contribution), and their stream may
  depend on the GPU model; the construction check catches the latter.

What this protects against: an honest-but-curious peer, or anyone reading the
wire or the collective's buffers, sees for each rank's contribution only
uniform noise; the **sum itself is revealed
to every rank**, as FedAvg needs. What it does **not** protect against:

- A rank that dies mid-round: there is no Shamir secret sharing of the seeds,
  so its masks cannot be removed and the round fails as any collective would
  (a rank that merely contributes nothing passes a zero tensor: masks cancel).
- A malicious rank that deviates from the protocol (wrong masks, an
  out-of-range or poisoned contribution, substituted public keys at the
  rendezvous): the keys are not authenticated and inputs are not proved.
- Ranks of one simulation on one machine share an operating system: memory,
  files and the process table are as visible as ever.
- With W = 2 the sum reveals the other rank's contribution to each of them;
  in general any W-1 colluding ranks learn the last one's.
- Quantization (error up to :func:`max_abs_error`) and clipping (counted).
- Reusing a round index would let anyone subtract two rounds' masked values
  and see the difference of two contributions: it is refused.

Defaults: ``clip = 8`` and ``levels = 2^22`` are Flower's SecAgg+ defaults
(``clipping_range=8.0``, ``quantization_range=4194304``, modulus 2^32).

Cost (BENCHMARKS.md): on CPU, per element and rank, a float32 add, W-1 AES
keystream words and modular adds in cache, and the conversion back; the
all-reduce moves twice fedavg's bytes with the int64 wire, as many with int32.
"""

from __future__ import annotations

import hashlib
import numbers
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedsim.privacy.fixedpoint import (
    DEFAULT_CLIP,
    DEFAULT_LEVELS,
    MODULUS,
    Grid,
    HostScratch,
    check_parameters,
    max_abs_error,
)
from fedsim.privacy.masks import CHECK_ELEMENTS, DEVICE_BLOCK, HOST_CHUNK, TORCH_CHUNK, mask_stream

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_LEVELS",
    "MODULUS",
    "PRGS",
    "WIRES",
    "SecureAggregation",
    "check_parameters",
    "max_abs_error",
]

PRGS = ("aes", "device")
WIRES = ("int64", "int32")

_VERSION = 1
_MASK32 = MODULUS - 1
_CHECK_ROUND = 2**64 - 1  # reserved round index of the construction check; never a real round
_MAX_ELEMENTS = 4 * (2**32 - 2)  # one AES-GCM counter stream: 2^32 - 2 blocks of 4 masks


class SecureAggregation:
    """Pairwise-masked sums over a process group: create once per run on every rank, then call
    :meth:`secure_sum_` in place of ``dist.all_reduce(tensor, SUM)``.

    Construction is collective (two ``all_gather_object`` calls over ``control_group``, and with
    ``wire="int32"`` one small all-reduce over ``group``): every rank of the group must create it with
    the same ``prg``, ``wire`` and device type.

    Args:
        group: Process group of the sums; the default group when None.
        device: Device of the tensors to be summed (``"cpu"``, ``"cuda"``, a ``torch.device``).
        prg: ``"aes"`` (cryptographic, default) or ``"device"`` (masks made on the tensor's device;
            statistical, see the module docstring).
        wire: What the all-reduce carries. ``"int64"`` (default): a separate int64 buffer (8 bytes per
            element, kept between calls) of values in ``[0, 2^32)``, whose sum cannot overflow.
            ``"int32"``: the masked values as int32 in the tensor's own memory, half the bytes and no
            buffer; it relies on the backend's int32 SUM wrapping modulo 2^32 (two's complement, as gloo
            and NCCL do; formally undefined in C++), which construction checks with a probe all-reduce.
            Should the all-reduce fail, an int32-wire tensor is left holding masked integers (keep a
            copy to restore); with int64 it is untouched until the sum arrives.
        control_group: Group for the key exchange (e.g. fedsim.dist's gloo group beside NCCL); the same
            ranks as ``group``. Defaults to ``group``.
        private_key: A fixed X25519 private key, for reproducible tests only: whoever knows it can
            remove this rank's masks. Fresh keys are drawn when None.

    Attributes:
        rank: This rank within ``group``.
        world_size: Ranks in ``group`` (W).
        last_clipped: Elements of the last call's tensor outside ``[-clip, clip]`` (±inf included),
            clipped before quantization. Log it: clipping biases the mean.
        last_nan: NaN elements of the last call's tensor; they entered as 0.
        last_timings: Seconds the last call spent in ``encode`` (quantize, mask), ``all_reduce`` and
            ``decode`` (dequantize); CPU tensors only (on CUDA it would need device syncs).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        device: torch.device | str = "cpu",
        prg: str = "aes",
        wire: str = "int64",
        control_group: dist.ProcessGroup | None = None,
        private_key: X25519PrivateKey | None = None,
    ):
        if prg not in PRGS:
            raise ValueError(f"prg must be one of {', '.join(PRGS)}; got {prg!r}")
        if wire not in WIRES:
            raise ValueError(f"wire must be one of {', '.join(WIRES)}; got {wire!r}")
        self.group = group
        self.control_group = control_group if control_group is not None else group
        self.device = torch.device(device)
        self.prg = prg
        self.wire = wire
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if (dist.get_rank(self.control_group), dist.get_world_size(self.control_group)) != (self.rank, self.world_size):
            raise ValueError("control_group must hold the same ranks, in the same order, as group")
        self.last_clipped = 0
        self.last_nan = 0
        self.last_timings: dict[str, float] = {}
        self._used_rounds: set[int] = set()
        self._send: torch.Tensor | None = None
        self._torch_engine_on_cpu = False  # tests: run the CUDA code path on CPU tensors
        self._secrets = self._agree(private_key or X25519PrivateKey.generate())
        self._check_masks()
        if wire == "int32":
            self._check_int32_wraps()

    # ----- key agreement -----------------------------------------------------------------------------------

    def _protocol(self) -> dict:
        """What every rank must agree on for the masks to cancel."""
        return {
            "version": _VERSION,
            "prg": self.prg,
            "wire": self.wire,
            "device": self.device.type,
            "block": DEVICE_BLOCK if self.prg == "device" else None,
            "byteorder": sys.byteorder,
        }

    def _agree(self, private_key: X25519PrivateKey) -> dict[int, bytes]:
        public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, (public, self._protocol()), group=self.control_group)
        keys = [entry[0] for entry in gathered]
        for peer, (_, protocol) in enumerate(gathered):
            if protocol != self._protocol():
                raise ValueError(
                    f"secure aggregation: rank {peer} uses {protocol}, rank {self.rank} "
                    f"uses {self._protocol()}; every rank must use the same prg, wire and device type"
                )
        if len(set(keys)) != len(keys):
            raise RuntimeError("secure aggregation: two ranks sent the same public key (broken randomness?)")
        secrets: dict[int, bytes] = {}
        for peer, peer_public in enumerate(keys):
            if peer == self.rank:
                continue
            shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
            low, high = sorted((self.rank, peer))
            info = b"fedsim-secagg/v1|" + keys[low] + keys[high] + low.to_bytes(4, "big") + high.to_bytes(4, "big")
            secrets[peer] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
        return secrets

    def pair_secret(self, peer: int) -> bytes:
        """The 256-bit secret this rank shares with ``peer`` (identical on both). For tests: never send it."""
        if peer == self.rank or peer not in self._secrets:
            raise ValueError(f"no pair secret between rank {self.rank} and {peer!r}")
        return self._secrets[peer]

    def _check_masks(self) -> None:
        """Compare, pair by pair, a hash of the mask of a reserved round: catches key or PRG disagreement."""
        digests = {}
        for peer, secret in self._secrets.items():
            stream = mask_stream(self.prg, secret, _CHECK_ROUND, self.device)
            mask = stream.take_host(CHECK_ELEMENTS) if self.prg == "aes" else stream.take_torch(DEVICE_BLOCK).cpu()
            digests[peer] = hashlib.blake2b(np.ascontiguousarray(np.asarray(mask)).tobytes(), digest_size=16).digest()
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, digests, group=self.control_group)
        bad = sorted(
            {
                tuple(sorted((i, j)))
                for i, mine in enumerate(gathered)
                for j, digest in mine.items()
                if gathered[j].get(i) != digest
            }
        )
        if bad:
            raise RuntimeError(
                f"secure aggregation: rank pairs {bad} derived different masks (the key agreement "
                f"failed, or prg={self.prg!r} gives different streams on their devices); "
                f"their sums would be garbage"
            )

    def _check_int32_wraps(self) -> None:
        """wire="int32" needs the backend's int32 SUM to wrap modulo 2^32: probe it (every element overflows)."""
        probe = torch.tensor([2**31 - 1, -(2**31), 2**30 + 12345] * 64, dtype=torch.int32, device=self.device)
        expected = [((int(v) * self.world_size + 2**31) % MODULUS) - 2**31 for v in probe[:3].tolist()] * 64
        dist.all_reduce(probe, op=dist.ReduceOp.SUM, group=self.group)
        if probe.tolist() != expected:
            raise RuntimeError(
                "secure aggregation: this backend's int32 all-reduce does not wrap modulo 2^32; use wire='int64'"
            )

    # ----- the sum -----------------------------------------------------------------------------------------

    def secure_sum_(
        self, tensor: torch.Tensor, round_index: int, clip: float = DEFAULT_CLIP, levels: int = DEFAULT_LEVELS
    ) -> torch.Tensor:
        """Replace ``tensor`` by its sum over the group, in place, with one all-reduce of masked integers.

        Every rank calls it with a tensor of the same size and the same ``round_index``, ``clip`` and
        ``levels`` (a dropped client passes zeros). The result equals the plain sum of the ranks'
        tensors within :func:`max_abs_error` per element, for elements in ``[-clip, clip]``; the same
        on every rank, bit for bit, and independent of the masks.

        Args:
            tensor: 1-d contiguous float32, on the device given at construction.
            round_index: A non-negative integer below 2^64 - 1, never used before with this object (each
                round's masks must be fresh); the round number, or a counter when summing more per round.
            clip: Elements are clipped to ``[-clip, clip]``; those outside are counted in ``last_clipped``.
            levels: Quantization levels: a power of two with ``world_size · levels < 2^32``.

        Raises:
            ValueError: bad parameters, tensor or round index; raised before any communication (on every
                rank alike, when all pass the same arguments).
        """
        plan = Grid(self.world_size, clip, levels)
        self._check_tensor(tensor)
        if (
            isinstance(round_index, bool)
            or not isinstance(round_index, numbers.Integral)
            or not 0 <= int(round_index) < _CHECK_ROUND
        ):
            raise ValueError(f"round_index must be an int in [0, 2**64 - 1), got {round_index!r}")
        round_index = int(round_index)
        if round_index in self._used_rounds:
            raise ValueError(
                f"round_index {round_index} was already used: reusing masks would reveal the "
                f"difference of two contributions"
            )
        self._used_rounds.add(round_index)
        streams = [
            (+1 if self.rank < peer else -1, mask_stream(self.prg, secret, round_index, tensor.device))
            for peer, secret in sorted(self._secrets.items())
        ]
        with torch.no_grad():
            if tensor.device.type == "cpu" and not self._torch_engine_on_cpu:
                self._host_sum(tensor, plan, streams)
            else:
                self._torch_sum(tensor, plan, streams)
        return tensor

    def release(self) -> None:
        """Free the int64 send buffer (8 bytes per element, kept between calls to spare the allocation)."""
        self._send = None

    def _check_tensor(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tensor.dim() != 1:
            raise ValueError(
                f"secure_sum_ needs a 1-d float32 tensor, got "
                f"{getattr(tensor, 'dtype', type(tensor).__name__)} "
                f"of shape {tuple(getattr(tensor, 'shape', ()))}"
            )
        if not tensor.is_contiguous():
            raise ValueError("secure_sum_ needs a contiguous tensor (e.g. fedsim.flat's reduced region)")
        if tensor.numel() > _MAX_ELEMENTS:
            raise ValueError(f"secure_sum_ sums at most {_MAX_ELEMENTS} elements per call (one AES counter stream)")
        if tensor.device.type != self.device.type:
            raise ValueError(
                f"tensor is on {tensor.device}, but this SecureAggregation was made for {self.device} "
                f"(the masks' PRG and the construction check depend on the device type)"
            )

    def _wire_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """What the all-reduce carries: the int64 buffer, or the tensor's own memory as int32."""
        if self.wire == "int32":
            return tensor.view(torch.int32)
        if self._send is None or self._send.numel() != tensor.numel() or self._send.device != tensor.device:
            self._send = None  # free the old one first
            self._send = torch.empty(tensor.numel(), dtype=torch.int64, device=tensor.device)
        return self._send

    def _host_sum(self, tensor: torch.Tensor, plan: Grid, streams: list) -> None:
        """CPU tensors: numpy uint32 arithmetic (wraps modulo 2^32 by definition) on cache-sized chunks."""
        x = tensor.detach().numpy()
        send = self._wire_tensor(tensor)
        wire = send.numpy().view(np.uint32) if self.wire == "int32" else send.numpy()
        chunk = DEVICE_BLOCK if self.prg == "device" else HOST_CHUNK
        work = HostScratch(chunk, plan)
        clipped = nans = 0
        started = time.perf_counter()
        for start in range(0, x.size, chunk):
            end = min(start + chunk, x.size)
            acc, c, n = work.quantize(x[start:end], plan)  # reads the chunk before an int32 wire overwrites it
            clipped, nans = clipped + c, nans + n
            # The last mask lands in the int32 wire directly (the tensor's memory): no extra pass.
            target = wire[start:end] if self.wire == "int32" else acc
            if not streams and self.wire == "int32":  # a group of one: no masks
                np.copyto(target, acc)
            for index, (sign, stream) in enumerate(streams):
                mask = stream.take_host(end - start, work.keystream)
                out = target if index == len(streams) - 1 else acc
                (np.add if sign > 0 else np.subtract)(acc, mask, out=out)
            if self.wire == "int64":
                wire[start:end] = acc  # zero-extends: every sent value is in [0, 2^32)
        self.last_clipped, self.last_nan = clipped, nans
        encoded = time.perf_counter()
        dist.all_reduce(send, op=dist.ReduceOp.SUM, group=self.group)
        reduced = time.perf_counter()
        for start in range(0, x.size, chunk):
            end = min(start + chunk, x.size)
            work.dequantize(wire[start:end], x[start:end], plan)
        self.last_timings = {
            "encode": encoded - started,
            "all_reduce": reduced - encoded,
            "decode": time.perf_counter() - reduced,
        }

    def _torch_sum(self, tensor: torch.Tensor, plan: Grid, streams: list) -> None:
        """CUDA tensors (and, for tests, CPU ones): int64 torch arithmetic on the device, no host syncs."""
        device = tensor.device
        send = self._wire_tensor(tensor)
        chunk = DEVICE_BLOCK if self.prg == "device" else TORCH_CHUNK
        clipped = torch.zeros((), dtype=torch.int64, device=device)
        nans = torch.zeros((), dtype=torch.int64, device=device)
        for start in range(0, tensor.numel(), chunk):
            end = min(start + chunk, tensor.numel())
            x = tensor[start:end]
            nan = torch.isnan(x)
            nans += nan.sum()
            if plan.exact_quantize:
                clipped += (x.abs() > plan.clip).sum()  # clip is a float32 here; NaN compares False, ±inf counts
                u = torch.add(x, float(plan.bias32)).clamp_(float(plan.low32), float(plan.high32))
                u = torch.where(nan, torch.full_like(u, float(plan.bias32)), u)
                acc = u.view(torch.int32).to(torch.int64)  # positive floats: the sign bit is clear
            else:
                wide = x.double()
                clipped += (wide.abs() > plan.clip).sum()  # in float64: clip need not be a float32
                u = wide.mul_(plan.scale).add_(plan.zero).clamp_(0, plan.levels)
                acc = torch.where(nan, torch.full_like(u, plan.zero), u).round_().to(torch.int64)
            for sign, stream in streams:
                mask = stream.take_torch(end - start)
                acc.add_(mask) if sign > 0 else acc.sub_(mask)
            acc.bitwise_and_(_MASK32)  # in [0, 2^32)
            if self.wire == "int32":  # the same value modulo 2^32, in int32's range: [-2^31, 2^31)
                acc.sub_(torch.where(acc >= MODULUS // 2, MODULUS, 0))
            send[start:end].copy_(acc)  # overwrites the int32 wire's chunk only after it was read
        dist.all_reduce(send, op=dist.ReduceOp.SUM, group=self.group)
        for start in range(0, tensor.numel(), chunk):
            end = min(start + chunk, tensor.numel())
            # Σ(q - zero) mod 2^32
            total = send[start:end].to(torch.int64).sub_(plan.total_center).bitwise_and_(_MASK32)
            total.sub_(torch.where(total >= MODULUS // 2, MODULUS, 0))  # the signed sum, |Σ| < 2^31
            # float32 where exact (|Σ| <= 2^24 and a power-of-two step), float64 otherwise
            value = total.to(torch.float32).mul_(plan.step) if plan.exact_dequantize else total.double().mul_(plan.step)
            tensor[start:end].copy_(value)
        self.last_clipped, self.last_nan = int(clipped.item()), int(nans.item())
        self.last_timings = {}  # phases would need device syncs
