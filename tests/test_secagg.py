"""Secure aggregation (fedsim.privacy.secagg) on real gloo ranks: the sum, what crosses ranks, the keys, the checks."""

from __future__ import annotations

import hashlib
import math
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import run_ranks
from fedsim.privacy import secagg
from fedsim.privacy.secagg import DEFAULT_CLIP, DEFAULT_LEVELS, SecureAggregation, check_parameters, max_abs_error

N = 100_000
WORLD = 3
U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53  # unit roundoff of float64


def _scenarios(rank: int, world: int) -> dict:
    """Every scenario below, one after the other, in one set of gloo ranks (a spawn costs seconds).

    A scenario that fails returns its exception, so only its test fails (the ones after it may then
    hang or fail too, if the ranks fell out of step).
    """
    out = {}
    for name, fn in SCENARIOS.items():
        try:
            out[name] = fn(rank, world)
        except (Exception, pytest.fail.Exception):
            out[name] = RuntimeError(f"rank {rank}, scenario {name!r}:\n{traceback.format_exc()}")  # picklable
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    """The scenarios' results, by rank (3 real gloo ranks)."""
    return run_ranks(_scenarios, WORLD, timeout=240)


def _results(ranks: list[dict], name: str) -> list:
    for value in (r[name] for r in ranks):
        if isinstance(value, BaseException):
            raise value
    return [r[name] for r in ranks]


def _contribution(rank: int, n: int = N, clip: float = DEFAULT_CLIP) -> torch.Tensor:
    """Each rank's own values, uniform inside [-clip, clip]."""
    g = torch.Generator().manual_seed(1000 + rank)
    return ((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * clip).float()


def _fixed_key(rank: int):
    """A deterministic X25519 key per rank, so the statistical tests are reproducible."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(hashlib.sha256(b"fedsim-secagg-test-%d" % rank).digest())


def _exact_sum(world: int, n: int = N, clip: float = DEFAULT_CLIP) -> tuple[np.ndarray, np.ndarray]:
    """The float64 sum of the ranks' float32 contributions, and the bound on its own rounding per element."""
    parts = np.stack([_contribution(r, n, clip).numpy().astype(np.float64) for r in range(world)])
    return parts.sum(axis=0), (world - 1) * U64 * np.abs(parts).sum(axis=0) * (1 + 1e-6)


# ----- the sum -------------------------------------------------------------------------------------------------


def _sum_every_way(rank: int, world: int):
    x = _contribution(rank)
    plain = x.clone()
    dist.all_reduce(plain)  # the plain float32 sum it replaces
    out = {"plain": plain.numpy()}
    for prg, wire, engine in [
        ("aes", "int64", "host"),
        ("aes", "int32", "host"),
        ("aes", "int64", "torch"),
        ("device", "int32", "torch"),
        ("device", "int64", "host"),
    ]:
        agg = SecureAggregation(prg=prg, wire=wire)
        agg._torch_engine_on_cpu = engine == "torch"  # the CUDA code path, on CPU tensors
        y = x.clone()
        assert agg.secure_sum_(y, round_index=7) is y
        out[(prg, wire, engine)] = (y.numpy(), agg.last_clipped, agg.last_nan)
    # The float64 path: a clip that is not a power of two.
    agg = SecureAggregation()
    y = _contribution(rank, clip=3.0)
    agg.secure_sum_(y, 0, clip=3.0, levels=2**16)
    out["general"] = y.numpy()
    return out


def test_secure_sum_equals_plain_sum_within_the_derived_bound(ranks):
    # Prepare + Execute (_sum_every_way): 3 ranks, 1e5 values each inside the clip range; plain all-reduce,
    # then the secure sum with each PRG, wire format and engine
    world = WORLD
    results = _results(ranks, "sum")

    # Assert: within the quantization bound of the exact sum, and of the plain float32 sum
    exact, exact_err = _exact_sum(world)
    bound = max_abs_error(world)
    assert bound == world * DEFAULT_CLIP / DEFAULT_LEVELS  # the exact float32 path: W half steps
    plain = results[0]["plain"].astype(np.float64)
    parts_abs = sum(np.abs(_contribution(r).numpy().astype(np.float64)) for r in range(world))
    gamma = (world - 1) * U32 / (1 - (world - 1) * U32)  # recursive summation of W float32 values
    reference = results[0][("aes", "int64", "host")][0]
    for key in [k for k in results[0] if isinstance(k, tuple)]:
        for rank in range(world):
            value, clipped, nans = results[rank][key]
            assert (clipped, nans) == (0, 0)
            np.testing.assert_array_equal(value, reference)  # every rank, PRG, wire and engine: bit for bit
    error = np.abs(reference.astype(np.float64) - exact)
    assert np.all(error <= bound + exact_err)
    assert np.all(np.abs(reference - plain) <= bound + gamma * parts_abs + exact_err)
    assert error.max() > bound / 2  # 1e5 elements reach into the bound: it is not vacuous
    # The float64 path with its own (derived, padded) bound.
    exact3, exact3_err = _exact_sum(world, clip=3.0)
    bound3 = max_abs_error(world, 3.0, 2**16)
    # W half steps, plus the float32 rounding of a result up to W·clip (a step of 6/2^16 is not a power of two)
    assert world * 3.0 / 2**16 < bound3 <= (world * 3.0 / 2**16 + world * 3.0 * 2.0**-24) * (1 + 1e-9)
    assert np.all(np.abs(results[0]["general"].astype(np.float64) - exact3) <= bound3 + exact3_err)


def _dropped_rank_and_edges(rank: int, world: int):
    step = 2 * DEFAULT_CLIP / DEFAULT_LEVELS
    out = {}
    for engine in ("host", "torch"):
        agg = SecureAggregation()
        agg._torch_engine_on_cpu = engine == "torch"
        x = _contribution(rank, 1000)
        if rank == 2:
            x.zero_()  # a dropped hospital contributes nothing
        x[0] = step / 2  # every rank on a half step: ties go to the even point 0
        x[1] = 1.5 * step  # ... and to the even point 2·step
        x[2] = [100.0, -math.inf, math.nan][rank]  # clipped to 8, clipped to -8, NaN enters as 0
        x[3] = [DEFAULT_CLIP, -DEFAULT_CLIP, 0.0][rank]  # the range's ends are not clipped
        x[4] = [-100.0, math.inf, 1.0][rank]  # clipped to -8, clipped to 8
        agg.secure_sum_(x, 0)
        first = (x.numpy().copy(), agg.last_clipped, agg.last_nan)
        # The next round: all in range again, and the counts follow the last call.
        y = torch.zeros(10)
        agg.secure_sum_(y, 1)
        out[engine] = first, (y.numpy(), agg.last_clipped, agg.last_nan)
    return out


def test_dropped_rank_worst_case_and_clipping(ranks):
    # Prepare + Execute (_dropped_rank_and_edges)
    world = WORLD
    step = 2 * DEFAULT_CLIP / DEFAULT_LEVELS
    results = _results(ranks, "edges")

    # Assert: the zero contribution is exact, so the other two carry the whole error
    (value, _, _), _ = results[0]["host"]
    expected = sum(_contribution(r, 1000).numpy().astype(np.float64) for r in range(2))
    rounding = U64 * sum(np.abs(_contribution(r, 1000).numpy().astype(np.float64)) for r in range(2))
    assert np.all(np.abs(value[5:] - expected[5:]) <= max_abs_error(2) + rounding[5:])
    # The bound is attained: three half steps, all rounded the same way
    assert value[0] == 0.0 and abs(value[0] - 3 * step / 2) == max_abs_error(world)
    assert value[1] == 3 * 2 * step
    assert value[2] == 0.0  # 8 + (-8) + 0
    assert value[3] == 0.0  # 8 + (-8) + 0, none clipped
    assert value[4] == 1.0  # -8 + 8 + 1
    for engine in ("host", "torch"):
        assert [r[engine][0][1:] for r in results] == [(2, 0), (2, 0), (0, 1)]  # (clipped, NaN) per rank
        for by_engine in results:
            (value_r, _, _), (zeros, clipped, nans) = by_engine[engine]
            np.testing.assert_array_equal(value_r, value)  # every rank and engine, bit for bit
            assert (clipped, nans) == (0, 0) and not zeros.any()


# ----- what crosses ranks --------------------------------------------------------------------------------------


SENT_CASES = [("int64", "host"), ("int32", "host"), ("int64", "torch"), ("int32", "torch")]


def _plaintexts(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two strongly structured contributions (rounds 3 and 4): without masks, what is sent would follow them."""
    ramp = torch.linspace(-DEFAULT_CLIP, DEFAULT_CLIP, N) * (1 + rank) / WORLD
    return ramp, torch.sin(ramp * 3)


def _record_what_is_sent(rank: int, world: int):
    sent = []
    originals = {
        name: getattr(dist, name)
        for name in (
            "all_reduce",
            "all_gather_object",
            "broadcast",
            "all_gather",
            "gather_object",
            "broadcast_object_list",
        )
    }

    def spy(name):
        def call(*args, **kwargs):
            payload = args[0] if args else None
            sent.append((name, payload.clone() if isinstance(payload, torch.Tensor) else None))
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, spy(name))
    out = {}
    try:
        for wire, engine in SENT_CASES:
            agg = SecureAggregation(wire=wire, private_key=_fixed_key(rank))
            agg._torch_engine_on_cpu = engine == "torch"
            for round_index, x in zip((3, 4), _plaintexts(rank), strict=True):
                sent.clear()
                agg.secure_sum_(x.clone(), round_index)
                out[wire, engine, round_index] = [(name, None if t is None else t.numpy()) for name, t in sent]
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return out


def _assert_uniform_and_uncorrelated(values: np.ndarray, plaintext: np.ndarray, what) -> None:
    from scipy.stats import chisquare

    # Uniform in Z_{2^32}: the top 8 bits spread evenly over 256 bins (deterministic: fixed keys).
    counts = np.bincount(values >> 24, minlength=256)
    assert chisquare(counts).pvalue > 1e-3, what
    # Uncorrelated with the plaintext: |r| would be ~1 without masks; ~N(0, 1/N) with them (5 sigma).
    r = np.corrcoef(values.astype(np.float64), plaintext.astype(np.float64))[0, 1]
    assert abs(r) < 5 / math.sqrt(N), (what, r)


def test_what_leaves_a_rank_is_uniform_noise_uncorrelated_with_its_values(ranks):
    # Prepare + Execute (_record_what_is_sent): every collective of a secure sum, per wire format and engine,
    # in two rounds
    results = _results(ranks, "sent")

    # Assert
    for rank, out in enumerate(results):
        plaintexts = [x.numpy() for x in _plaintexts(rank)]
        for wire, engine in SENT_CASES:
            rounds = []
            for round_index, plaintext in zip((3, 4), plaintexts, strict=True):
                sent = out[wire, engine, round_index]
                assert [name for name, _ in sent] == ["all_reduce"]  # one collective, nothing else
                values = sent[0][1]
                assert values.shape == (N,)
                if wire == "int64":
                    assert values.dtype == np.int64 and values.min() >= 0 and values.max() < 2**32
                    values = values.astype(np.uint32)
                else:
                    assert values.dtype == np.int32
                    values = values.view(np.uint32)
                _assert_uniform_and_uncorrelated(values, plaintext, (rank, wire, engine, round_index))
                rounds.append(values)
            # Fresh masks every round: the difference of two rounds' values does not give the difference
            # of the contributions away either.
            _assert_uniform_and_uncorrelated(
                rounds[1] - rounds[0], plaintexts[1] - plaintexts[0], (rank, wire, engine, "round 4 - round 3")
            )
    # The same plaintext shape on every rank, yet different values sent.
    assert not np.array_equal(results[0]["int64", "host", 3][0][1], results[1]["int64", "host", 3][0][1])


# ----- keys -----------------------------------------------------------------------------------------------------


def _agree_twice(rank: int, world: int):
    x = _contribution(rank, 5000)
    runs = []
    for _ in range(2):  # two runs: fresh keys each time
        agg = SecureAggregation()
        y = x.clone()
        agg.secure_sum_(y, 0)
        runs.append(({peer: agg.pair_secret(peer) for peer in range(world) if peer != rank}, y.numpy()))
    with pytest.raises(ValueError, match="pair secret"):
        agg.pair_secret(rank)
    return runs


def test_key_agreement_pairs_share_fresh_distinct_secrets_and_sums_do_not_depend_on_them(ranks):
    # Prepare + Execute (_agree_twice)
    world = WORLD
    results = _results(ranks, "keys")

    # Assert
    for run in range(2):
        secrets = [results[r][run][0] for r in range(world)]
        pairs = {}
        for i in range(world):
            for j in range(i + 1, world):
                assert secrets[i][j] == secrets[j][i]  # s_ij == s_ji
                assert len(secrets[i][j]) == 32
                pairs[(i, j)] = secrets[i][j]
        assert len(set(pairs.values())) == len(pairs)  # distinct pairs, distinct secrets
    first, second = ({s for r in range(world) for s in results[r][run][0].values()} for run in range(2))
    assert not first & second  # fresh keys: no secret repeats across runs
    for r in range(world):
        np.testing.assert_array_equal(results[r][0][1], results[r][1][1])  # yet the same sum, bit for bit
        np.testing.assert_array_equal(results[r][0][1], results[0][0][1])


def _disagree(rank: int, world: int):
    # A rank with another PRG: refused on every rank, after the one exchange of public keys.
    with pytest.raises(ValueError, match="same prg"):
        SecureAggregation(prg="device" if rank == 0 else "aes")
    # A rank whose masks do not match its peers' (e.g. a PRG whose stream differs between devices).
    real = secagg.mask_stream
    if rank == 1:
        secagg.mask_stream = lambda prg, secret, round_index, device: real(prg, secret[::-1], round_index, device)
    try:
        with pytest.raises(RuntimeError, match=r"rank pairs \[\(0, 1\), \(1, 2\)\] derived different masks"):
            SecureAggregation()
    finally:
        secagg.mask_stream = real
    return True


def test_construction_refuses_ranks_whose_masks_would_not_cancel(ranks):
    assert _results(ranks, "disagree") == [True] * WORLD


# ----- parameters -----------------------------------------------------------------------------------------------


def test_parameter_validation():
    check_parameters(3, DEFAULT_CLIP, DEFAULT_LEVELS)
    for clip in (0.0, -1.0, math.inf, math.nan, "8", True):
        with pytest.raises(ValueError, match="clip"):
            check_parameters(3, clip, DEFAULT_LEVELS)
    for levels in (0, 1, 3, 2**22 + 2, 4.0, True):
        with pytest.raises(ValueError, match="levels"):
            check_parameters(3, DEFAULT_CLIP, levels)
    check_parameters(1, DEFAULT_CLIP, 2**31)
    with pytest.raises(ValueError, match=r"must stay below 2\*\*32.*levels <= 1073741824 \(2\*\*30\) for 3 ranks"):
        check_parameters(3, DEFAULT_CLIP, 2**31)  # 3·2^31 >= 2^32: the sum could wrap
    check_parameters(1023, DEFAULT_CLIP, 2**22)
    with pytest.raises(ValueError, match="below 2\\*\\*32"):
        check_parameters(1024, DEFAULT_CLIP, 2**22)  # 2^10·2^22 = 2^32
    with pytest.raises(ValueError, match="world_size"):
        check_parameters(0, DEFAULT_CLIP, DEFAULT_LEVELS)
    with pytest.raises(ValueError, match="levels"):
        max_abs_error(3, DEFAULT_CLIP, 3)
    assert max_abs_error(3) == 3 * 2.0**-19  # 3 half steps of 16/2^22


def _bad_calls(rank: int, world: int):
    agg = SecureAggregation()
    x = torch.zeros(8)
    agg.secure_sum_(x, 5)
    cases = [
        (lambda: agg.secure_sum_(torch.zeros(8), 5), "already used"),
        (lambda: agg.secure_sum_(torch.zeros(8), -1), "round_index"),
        (lambda: agg.secure_sum_(torch.zeros(8), 2**64 - 1), "round_index"),
        (lambda: agg.secure_sum_(torch.zeros(8, dtype=torch.float64), 6), "float32"),
        (lambda: agg.secure_sum_(torch.zeros(2, 4), 6), "1-d"),
        (lambda: agg.secure_sum_(torch.zeros(16)[::2], 6), "contiguous"),
        (lambda: agg.secure_sum_(torch.zeros(8), 6, clip=0.0), "clip"),
        (lambda: agg.secure_sum_(torch.zeros(8), 6, levels=2**31), "below 2\\*\\*32"),
        (lambda: SecureAggregation(prg="xor"), "prg"),
        (lambda: SecureAggregation(wire="float"), "wire"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    agg.secure_sum_(x, 6)  # the errors came before any collective: the group is still in step
    return x.numpy()


def test_bad_calls_raise_before_any_communication(ranks):
    for value in _results(ranks, "bad calls"):
        np.testing.assert_array_equal(value, np.zeros(8, np.float32))


SCENARIOS = {
    "sum": _sum_every_way,
    "edges": _dropped_rank_and_edges,
    "sent": _record_what_is_sent,
    "keys": _agree_twice,
    "disagree": _disagree,
    "bad calls": _bad_calls,
}


def test_mask_streams_are_counter_based_and_fresh_per_round_and_block():
    # Prepare
    secret = hashlib.sha256(b"pair").digest()
    cpu = torch.device("cpu")

    # Execute + Assert: AES-CTR gives the same stream however it is cut, another one per round
    whole = secagg.mask_stream("aes", secret, 5, cpu).take_host(10_000)
    stream = secagg.mask_stream("aes", secret, 5, cpu)
    pieces = np.concatenate([stream.take_host(n) for n in (1, 999, 4096, 4904)])
    np.testing.assert_array_equal(pieces, whole)
    assert not np.array_equal(secagg.mask_stream("aes", secret, 6, cpu).take_host(10_000), whole)
    # The device PRG: reseeded per block, so two blocks differ; also the same however it is cut
    block = secagg.DEVICE_BLOCK
    stream = secagg.mask_stream("device", secret, 5, cpu)
    first, second = stream.take_torch(block), stream.take_torch(block)
    assert not torch.equal(first, second)
    assert int(first.min()) >= 0 and int(first.max()) < 2**32
    again = secagg.mask_stream("device", secret, 5, cpu)
    np.testing.assert_array_equal(
        torch.cat([again.take_torch(3), again.take_torch(2 * block - 3)]).numpy(), torch.cat([first, second]).numpy()
    )
