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
import math
import numbers
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DEFAULT_CLIP = 8.0
DEFAULT_LEVELS = 2**22
MODULUS = 2**32
PRGS = ("aes", "device")
WIRES = ("int64", "int32")

_VERSION = 1
_MASK32 = MODULUS - 1
_HOST_CHUNK = 1 << 18  # elements per chunk on the host: 1 MiB float32, so the passes stay in cache
_TORCH_CHUNK = 1 << 22  # elements per chunk of the torch engine (CUDA tensors) with AES masks
_DEVICE_BLOCK = 1 << 20  # elements per reseeded block of the "device" PRG (its chunk size too)
_CHECK_ROUND = 2**64 - 1  # reserved round index of the construction check; never a real round
_CHECK_ELEMENTS = 4096
_MAX_ELEMENTS = 4 * (2**32 - 2)  # one AES-GCM counter stream: 2^32 - 2 blocks of 4 masks
_F32_MAX_EXP = 127  # largest binary exponent of a finite float32
_F32_MIN_NORMAL_EXP = -126


def _is_power_of_two(value: float) -> bool:
    return value > 0 and math.isfinite(value) and math.frexp(value)[0] == 0.5


class _Plan:
    """Quantization grid and arithmetic for one (world size, clip, levels); validated on construction.

    Two paths, chosen from the parameters (the same on every rank):

    - exact: when the step ``2·clip/levels`` is a power of two (clip is) and
      ``levels <= 2^23``, one float32 addition ``x + (base + clip)`` rounds to the grid
      (``base = step·2^23``: float32 spacing in ``[base, 2·base)`` is the step), and the
      bit pattern of the result is ``bits(base) + q``. When also ``W·levels/2 <= 2^24``,
      the dequantized sum ``Σq'·step`` is exact in float32. No rounding but the
      quantization's own.
    - float64 otherwise: the same grid computed in float64, then rounded to float32;
      :func:`max_abs_error` accounts for each rounding.
    """

    def __init__(self, world: int, clip: float, levels: int):
        check_parameters(world, clip, levels)
        self.world = int(world)
        self.clip = float(clip)
        self.levels = levels = int(levels)
        self.step = 2.0 * self.clip / levels  # exact: levels is a power of two
        self.scale = levels / (2.0 * self.clip)  # float64; exact when clip is a power of two
        self.zero = levels // 2  # the integer that stands for 0.0
        pow2 = _is_power_of_two(self.step)
        self.exact_quantize = pow2 and levels <= 2**23
        self.exact_dequantize = pow2 and world * levels // 2 <= 2**24
        if self.exact_quantize:
            base = self.step * 2.0**23
            self.base32 = np.float32(base)
            self.bias32 = np.float32(base + self.clip)  # x + bias rounds x + clip to the grid
            self.low32 = np.float32(base)
            self.high32 = np.float32(base + 2.0 * self.clip)
            offset = int(self.base32.view(np.uint32))  # bits(base + k·step) = bits(base) + k
        else:
            offset = 0
        # What each rank's sent value holds besides q - zero and the masks; the decode removes W of them.
        self.center = (offset + self.zero) % MODULUS
        self.total_center = self.world * self.center % MODULUS


def check_parameters(world_size: int, clip: float, levels: int) -> None:
    """Raise ``ValueError`` unless (world size, clip, levels) make a sum that cannot wrap modulo 2^32.

    clip must be finite and > 0 (and fit float32 for W ranks), levels a power of two >= 2 with
    ``world_size · levels < 2^32``: the sum of W quantized values, each in ``[0, levels]``, stays below
    the modulus, so removing the masks modulo 2^32 gives the exact integer sum.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, numbers.Integral) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    world_size = int(world_size)
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real):
        raise ValueError(f"clip must be a number > 0, got {clip!r}")
    clip = float(clip)
    if not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be finite and > 0, got {clip!r}")
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral):
        raise ValueError(f"levels must be an int power of two >= 2, got {levels!r}")
    levels = int(levels)
    if levels < 2 or levels & (levels - 1):
        raise ValueError(f"levels must be a power of two >= 2, got {levels}")
    if world_size * levels >= MODULUS:
        largest = 1 << (((MODULUS - 1) // world_size).bit_length() - 1)
        raise ValueError(
            f"levels={levels} with {world_size} ranks: the sum of quantized values reaches "
            f"world_size*levels = {world_size * levels}, which must stay below 2**32 = {MODULUS} or it wraps; "
            f"use levels <= {largest} (2**{largest.bit_length() - 1}) for {world_size} ranks"
        )
    if math.frexp(world_size * clip)[1] > _F32_MAX_EXP:
        raise ValueError(f"clip={clip} with {world_size} ranks: the sum could exceed float32's range")
    if math.frexp(2.0 * clip / levels)[1] - 1 < _F32_MIN_NORMAL_EXP:
        raise ValueError(f"clip={clip} with levels={levels}: the quantization step is below float32's normal range")


def max_abs_error(world_size: int, clip: float = DEFAULT_CLIP, levels: int = DEFAULT_LEVELS) -> float:
    """The worst-case absolute error, per element, of :meth:`SecureAggregation.secure_sum_` for inputs in range.

    Each rank rounds ``x`` (with ``|x| <= clip``) to the nearest point of a grid of step
    ``step = 2·clip/levels``: an error of at most half a step. The modular sum of the quantized
    values is exact (``W·levels < 2^32``), so the W errors add up to at most ``W·step/2 =
    W·clip/levels``: the bound, attained when every rank sits on a half step on the same side
    (the tests do this). For the defaults (8, 2^22) and 3 ranks: 3·2^-19 ≈ 5.72e-6.

    When the exact float32 path does not apply (clip not a power of two, ``levels > 2^23``, or
    ``W·levels/2 > 2^24``, see :class:`_Plan`), float64 arithmetic adds at most
    ``levels·2^-52`` steps per rank to the rounding (the products and the sum that form
    ``x·levels/(2·clip) + levels/2``), and the dequantization ``Σq'·step`` in float64 then
    float32 adds at most ``W·clip·(2^-52 + 2^-24)`` (2^-52 only when the step is not a power of
    two); this branch is padded by a factor 1 + 2^-40 for the rounding of the bound itself.
    Elements outside ``[-clip, clip]`` are off by their clipping too (counted, not bounded).
    """
    plan = _Plan(world_size, clip, levels)
    if plan.exact_quantize and plan.exact_dequantize:
        return world_size * plan.step / 2  # exact: powers of two times a small integer
    per_rank = 0.5 if plan.exact_quantize else 0.5 + levels * 2.0**-52
    bound = world_size * per_rank * plan.step
    if not plan.exact_dequantize:
        product = 0.0 if _is_power_of_two(plan.step) else 2.0**-52
        bound += world_size * plan.clip * (product + 2.0**-24)
    return bound * (1 + 2.0**-40)


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

    def __init__(self, group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
                 prg: str = "aes", wire: str = "int64", control_group: dist.ProcessGroup | None = None,
                 private_key: X25519PrivateKey | None = None):
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
        return {"version": _VERSION, "prg": self.prg, "wire": self.wire, "device": self.device.type,
                "block": _DEVICE_BLOCK if self.prg == "device" else None, "byteorder": sys.byteorder}

    def _agree(self, private_key: X25519PrivateKey) -> dict[int, bytes]:
        public = private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, (public, self._protocol()), group=self.control_group)
        keys = [entry[0] for entry in gathered]
        for peer, (_, protocol) in enumerate(gathered):
            if protocol != self._protocol():
                raise ValueError(f"secure aggregation: rank {peer} uses {protocol}, rank {self.rank} "
                                 f"uses {self._protocol()}; every rank must use the same prg, wire and device type")
        if len(set(keys)) != len(keys):
            raise RuntimeError("secure aggregation: two ranks sent the same public key (broken randomness?)")
        secrets: dict[int, bytes] = {}
        for peer, peer_public in enumerate(keys):
            if peer == self.rank:
                continue
            shared = private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
            low, high = sorted((self.rank, peer))
            info = (b"fedsim-secagg/v1|" + keys[low] + keys[high]
                    + low.to_bytes(4, "big") + high.to_bytes(4, "big"))
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
            stream = _stream(self.prg, secret, _CHECK_ROUND, self.device)
            mask = stream.take_host(_CHECK_ELEMENTS) if self.prg == "aes" else stream.take_torch(_DEVICE_BLOCK).cpu()
            digests[peer] = hashlib.blake2b(np.ascontiguousarray(np.asarray(mask)).tobytes(), digest_size=16).digest()
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, digests, group=self.control_group)
        bad = sorted({tuple(sorted((i, j))) for i, mine in enumerate(gathered) for j, digest in mine.items()
                      if gathered[j].get(i) != digest})
        if bad:
            raise RuntimeError(f"secure aggregation: rank pairs {bad} derived different masks (the key agreement "
                               f"failed, or prg={self.prg!r} gives different streams on their devices); "
                               f"their sums would be garbage")

    def _check_int32_wraps(self) -> None:
        """wire="int32" needs the backend's int32 SUM to wrap modulo 2^32: probe it (every element overflows)."""
        probe = torch.tensor([2**31 - 1, -(2**31), 2**30 + 12345] * 64, dtype=torch.int32, device=self.device)
        expected = [((int(v) * self.world_size + 2**31) % MODULUS) - 2**31 for v in probe[:3].tolist()] * 64
        dist.all_reduce(probe, op=dist.ReduceOp.SUM, group=self.group)
        if probe.tolist() != expected:
            raise RuntimeError("secure aggregation: this backend's int32 all-reduce does not wrap modulo 2^32; "
                               "use wire='int64'")

    # ----- the sum -----------------------------------------------------------------------------------------

    def secure_sum_(self, tensor: torch.Tensor, round_index: int, clip: float = DEFAULT_CLIP,
                    levels: int = DEFAULT_LEVELS) -> torch.Tensor:
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
        plan = _Plan(self.world_size, clip, levels)
        self._check_tensor(tensor)
        if isinstance(round_index, bool) or not isinstance(round_index, numbers.Integral) \
                or not 0 <= int(round_index) < _CHECK_ROUND:
            raise ValueError(f"round_index must be an int in [0, 2**64 - 1), got {round_index!r}")
        round_index = int(round_index)
        if round_index in self._used_rounds:
            raise ValueError(f"round_index {round_index} was already used: reusing masks would reveal the "
                             f"difference of two contributions")
        self._used_rounds.add(round_index)
        streams = [(+1 if self.rank < peer else -1, _stream(self.prg, secret, round_index, tensor.device))
                   for peer, secret in sorted(self._secrets.items())]
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
            raise ValueError(f"secure_sum_ needs a 1-d float32 tensor, got "
                             f"{getattr(tensor, 'dtype', type(tensor).__name__)} "
                             f"of shape {tuple(getattr(tensor, 'shape', ()))}")
        if not tensor.is_contiguous():
            raise ValueError("secure_sum_ needs a contiguous tensor (e.g. fedsim.flat's reduced region)")
        if tensor.numel() > _MAX_ELEMENTS:
            raise ValueError(f"secure_sum_ sums at most {_MAX_ELEMENTS} elements per call (one AES counter stream)")
        if tensor.device.type != self.device.type:
            raise ValueError(f"tensor is on {tensor.device}, but this SecureAggregation was made for {self.device} "
                             f"(the masks' PRG and the construction check depend on the device type)")

    def _wire_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """What the all-reduce carries: the int64 buffer, or the tensor's own memory as int32."""
        if self.wire == "int32":
            return tensor.view(torch.int32)
        if self._send is None or self._send.numel() != tensor.numel() or self._send.device != tensor.device:
            self._send = None  # free the old one first
            self._send = torch.empty(tensor.numel(), dtype=torch.int64, device=tensor.device)
        return self._send

    def _host_sum(self, tensor: torch.Tensor, plan: _Plan, streams: list) -> None:
        """CPU tensors: numpy uint32 arithmetic (wraps modulo 2^32 by definition) on cache-sized chunks."""
        x = tensor.detach().numpy()
        send = self._wire_tensor(tensor)
        wire = send.numpy().view(np.uint32) if self.wire == "int32" else send.numpy()
        chunk = _DEVICE_BLOCK if self.prg == "device" else _HOST_CHUNK
        work = _HostScratch(chunk, plan)
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
        self.last_timings = {"encode": encoded - started, "all_reduce": reduced - encoded,
                             "decode": time.perf_counter() - reduced}

    def _torch_sum(self, tensor: torch.Tensor, plan: _Plan, streams: list) -> None:
        """CUDA tensors (and, for tests, CPU ones): int64 torch arithmetic on the device, no host syncs."""
        device = tensor.device
        send = self._wire_tensor(tensor)
        chunk = _DEVICE_BLOCK if self.prg == "device" else _TORCH_CHUNK
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


class _HostScratch:
    """Per-call cache-sized buffers of the host engine."""

    def __init__(self, chunk: int, plan: _Plan):
        self.f32 = np.empty(chunk, np.float32)
        self.f64 = None if plan.exact_quantize and plan.exact_dequantize else np.empty(chunk, np.float64)
        self.u32 = np.empty(chunk, np.uint32)
        self.keystream = np.empty(chunk, np.uint32)
        self._step32 = np.float32(plan.step)
        self._total_center = np.uint32(plan.total_center)

    def quantize(self, x: np.ndarray, plan: _Plan) -> tuple[np.ndarray, int, int]:
        """(q + offset as uint32, clipped count, NaN count) of a chunk; see :class:`_Plan`."""
        n = x.size
        in_range = -plan.clip <= float(x.min()) and float(x.max()) <= plan.clip  # NaN: False
        clipped = nans = 0
        if not in_range:
            nan = np.isnan(x)
            nans = int(np.count_nonzero(nan))
            limit = np.float64(plan.clip)  # compared in float64: clip need not be a float32
            clipped = int(np.count_nonzero(x > limit)) + int(np.count_nonzero(x < -limit))
        if plan.exact_quantize:
            u = self.f32[:n]
            np.add(x, plan.bias32, out=u)  # one correctly rounded float32 add: the grid point, ties to even
            if not in_range:
                np.clip(u, plan.low32, plan.high32, out=u)
                if nans:
                    u[nan] = plan.bias32
            return u.view(np.uint32), clipped, nans
        u = self.f64[:n]
        np.multiply(x, np.float64(plan.scale), out=u)
        np.add(u, np.float64(plan.zero), out=u)
        if not in_range:
            np.clip(u, 0.0, float(plan.levels), out=u)
            if nans:
                u[nan] = plan.zero
        np.rint(u, out=u)
        acc = self.u32[:n]
        np.copyto(acc, u, casting="unsafe")  # integers in [0, levels]: exact
        return acc, clipped, nans

    def dequantize(self, total: np.ndarray, out: np.ndarray, plan: _Plan) -> None:
        """``out = Σ(q - zero)·step`` from a chunk of the all-reduced sums (int64, or uint32 bits of the int32 wire)."""
        n = total.size
        acc = self.u32[:n]
        if total.dtype != np.uint32:
            np.copyto(acc, total, casting="unsafe")  # int64 to unsigned: modulo 2^32 by definition
            total = acc
        np.subtract(total, self._total_center, out=acc)  # Σ(q - zero) modulo 2^32
        signed = acc.view(np.int32)  # the same bits as int32: the signed sum, |Σ| < 2^31
        if plan.exact_dequantize:  # exact: |Σ| <= 2^24, power-of-two step
            wide = self.f32[:n]
            np.copyto(wide, signed, casting="unsafe")
            np.multiply(wide, self._step32, out=out)
        else:
            wide = self.f64[:n]
            np.multiply(signed, np.float64(plan.step), out=wide)
            np.copyto(out, wide, casting="same_kind")


def _stream(prg: str, secret: bytes, round_index: int, device: torch.device):
    cls = _AesStream if prg == "aes" else _DeviceStream
    return cls(secret, round_index, torch.device(device))


class _AesStream:
    """Masks of one pair and round: an AES-128 counter-mode keystream as uint32, keyed by the pair secret.

    The counter block is (round index, 64 bits) || (32 zero bits) || (block number + 2, 32 bits), i.e.
    AES-GCM's counter mode with the round as IV: the keystream is taken from OpenSSL's GCM encryption of
    zeros (the tag is discarded), whose VAES code is about twice as fast as its plain CTR here. Streams of
    different rounds never overlap, and the stream is the same however it is cut into chunks.
    """

    _zeros = np.zeros(4 * max(_HOST_CHUNK, _TORCH_CHUNK, _DEVICE_BLOCK, _CHECK_ELEMENTS), np.uint8)

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
            self._pinned = torch.empty(max(n, _TORCH_CHUNK), dtype=torch.int32, pin_memory=True)
        host = self._pinned[:n]
        self.take_host(n, host.numpy().view(np.uint32))
        return host.to(device)  # blocking: the pinned buffer is reused next chunk


class _DeviceStream:
    """Masks of one pair and round from ``torch.randint`` on ``device``, reseeded every ``_DEVICE_BLOCK``
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
        self._buffer = torch.randint(0, MODULUS, (_DEVICE_BLOCK,), generator=self._generator,
                                     dtype=torch.int64, device=self._device)
        self._block += 1
        self._used = 0

    def take_torch(self, n: int) -> torch.Tensor:
        """The next ``n`` masks as int64 in ``[0, 2^32)`` on the device."""
        parts = []
        while n:
            if self._buffer is None or self._used == _DEVICE_BLOCK:
                self._next_block()
            take = min(n, _DEVICE_BLOCK - self._used)
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
