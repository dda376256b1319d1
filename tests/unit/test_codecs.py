"""hierfed.comm.codecs: error bounds, unbiasedness, error feedback, sizes, wire checks, specs."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest

from hierfed.comm.codecs import HEADER_SIZE, CodecError, ErrorFeedback, parse_codec, read_header
from hierfed.errors import HierfedError

ALL_SPECS = [
    "identity", "fp16", "bf16", "int8", "int4", "int8:block=64", "int4:block=7",
    "topk:0.05", "randk:0.1", "randk:0.3,scaled=false", "topk:0.05 > int8", "topk:0.5 > fp16",
    "randk:0.02 > int4:block=16", "topk:0.25 > bf16",
]  # fmt: skip


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def vec(dim: int, seed: int = 0) -> np.ndarray:
    return rng(seed).standard_normal(dim).astype(np.float32)


def step_per_value(x: np.ndarray, bits: int, block: int) -> np.ndarray:
    """(max - min) / (2^bits - 1) of each value's block: the quantisation step the bound refers to."""
    starts = np.arange(0, x.size, block)
    span = np.maximum.reduceat(x, starts).astype(np.float64) - np.minimum.reduceat(x, starts)
    return np.repeat(span / (2**bits - 1), block)[: x.size]


# ---------------------------------------------------------------- round-trip error bounds


@pytest.mark.parametrize("spec", ["identity", "fp32", "topk:1", "randk:1"])
def test_lossless_codecs_are_exact(spec: str) -> None:
    x = vec(1000)
    c = parse_codec(spec)
    np.testing.assert_array_equal(c.decode(c.encode(x, rng()), 1000), x)


def test_identity_flag_marks_plain_float32_only() -> None:
    assert parse_codec("identity").is_identity and parse_codec("fp32").is_identity
    assert not any(parse_codec(s).is_identity for s in ["fp16", "int8", "topk:1", "topk:0.1 > identity"])
    body = parse_codec("identity").encode(vec(10))[HEADER_SIZE:]
    np.testing.assert_array_equal(body.view("<f4"), vec(10))  # the body is the raw little-endian vector


def wide_range(dim: int) -> np.ndarray:
    """Values from 1e-6 to 1e4 in magnitude, both signs."""
    r = rng(3)
    return (r.standard_normal(dim) * 10.0 ** r.uniform(-6, 4, dim)).astype(np.float32)


def test_fp16_relative_error() -> None:
    # Round to nearest: |err| <= 2^-11 |x| in fp16's normal range; below 2^-14 the spacing is 2^-24,
    # so the absolute error is at most 2^-25.
    x = wide_range(5000)
    c = parse_codec("fp16")
    y = c.decode(c.encode(x))
    assert np.all(np.abs(y.astype(np.float64) - x) <= 2.0**-11 * np.abs(x) + 2.0**-25)


def test_fp16_rejects_out_of_range() -> None:
    x = np.array([1.0, 7e4], dtype=np.float32)
    with pytest.raises(CodecError, match=r"fp16 cannot encode .* index 1.*bf16"):
        parse_codec("fp16").encode(x)


def test_bf16_relative_error_and_range() -> None:
    # bf16 keeps 8 significant bits: round to nearest gives |err| <= 2^-8 |x| over float32's range.
    x = np.concatenate([wide_range(5000), np.array([1e30, -3e-30, 0.0], dtype=np.float32)])
    c = parse_codec("bf16")
    y = c.decode(c.encode(x))
    assert np.all(np.abs(y.astype(np.float64) - x) <= 2.0**-8 * np.abs(x))
    with pytest.raises(CodecError, match="bf16"):
        c.encode(np.array([np.finfo(np.float32).max], dtype=np.float32))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("block,dim", [(256, 1000), (64, 4097), (7, 301), (1, 5), (1000, 999)])
def test_int_quantisation_error_is_below_one_step(bits: int, block: int, dim: int) -> None:
    x = wide_range(dim) if dim % 2 else vec(dim)
    c = parse_codec(f"int{bits}:block={block}")
    y = c.decode(c.encode(x, rng()), dim)
    step = step_per_value(x, bits, block)
    # |decode - x| <= step (it is one of the two grid points around x), plus float32 rounding of
    # the decoded value and of the stored step (rounded up by at most one ulp).
    err = np.abs(y.astype(np.float64) - x)
    assert np.all(err <= step * (1 + 1e-6) + 2.0**-23 * np.abs(x) + 1e-30)


def test_int_quantisation_of_a_constant_block_is_exact() -> None:
    x = np.full(300, -1.25, dtype=np.float32)
    for spec in ["int8", "int4:block=16"]:
        c = parse_codec(spec)
        np.testing.assert_array_equal(c.decode(c.encode(x, rng())), x)


def test_topk_keeps_exactly_the_k_largest() -> None:
    x = vec(1000)
    c = parse_codec("topk:0.05")
    y = c.decode(c.encode(x))
    k = 50
    top = np.argsort(-np.abs(x))[:k]  # magnitudes of a continuous draw are distinct
    assert set(np.flatnonzero(y)) == set(top)
    np.testing.assert_array_equal(y[top], x[top])
    assert np.abs(x[np.flatnonzero(y == 0)]).max() < np.abs(x[top]).min()


def test_topk_then_int8_quantises_the_kept_values() -> None:
    x = vec(4000)
    c = parse_codec("topk:0.1 > int8:block=64")
    y = c.decode(c.encode(x, rng()))
    top = np.sort(np.argsort(-np.abs(x))[:400])
    np.testing.assert_array_equal(np.flatnonzero(y), top)
    step = step_per_value(x[top], 8, 64)  # blocks of the kept values, in index order
    assert np.all(np.abs(y[top].astype(np.float64) - x[top]) <= step * (1 + 1e-6) + 1e-7)


def test_sparsifier_k_is_exact_ceil() -> None:
    # 0.07 * 100 is 7.000000000000001 in floating point; k must still be 7.
    y = parse_codec("topk:0.07").decode(parse_codec("topk:0.07").encode(vec(100)))
    assert np.count_nonzero(y) == 7
    assert np.count_nonzero(parse_codec("topk:0.07").decode(parse_codec("topk:0.07").encode(vec(101)))) == 8


# ---------------------------------------------------------------- unbiasedness


@pytest.mark.parametrize("bits,block", [(8, 256), (4, 32)])
def test_stochastic_quantisation_is_unbiased(bits: int, block: int) -> None:
    # Every block spans [-1, -1 + L step] with step = 2^-(bits - 1) (exact in float32), so the
    # codec's grid is known; every other value sits 0.3 step above a grid point, where rounding to
    # nearest would be off by 0.3 step.
    dim, levels, step = 512, 2**bits - 1, 2.0 ** -(bits - 1)
    j = rng(5).integers(0, levels, dim)
    x = (-1.0 + (j + 0.3) * step).astype(np.float32)
    x[0::block], x[1::block] = -1.0, -1.0 + levels * step
    c = parse_codec(f"int{bits}:block={block}")
    assert np.all(step_per_value(x, bits, block) == step)
    n = 2000
    g = rng(11)
    mean = np.zeros(dim)
    for _ in range(n):
        mean += c.decode(c.encode(x, g))
    mean /= n
    # Each draw is one of the two grid points around x, one step apart, so Hoeffding gives, per
    # value, P(|mean - x| >= t) <= 2 exp(-2 n t^2 / step^2). With t = step sqrt(ln(2 / 1e-9) / (2n))
    # (0.073 step for n = 2000) a value fails with probability <= 1e-9, whatever the distribution.
    tol = step * math.sqrt(math.log(2 / 1e-9) / (2 * n))
    assert np.all(np.abs(mean - x) <= tol)
    assert 0.3 * step > 4 * tol  # the test would catch round-to-nearest's bias many times over


def test_random_k_is_unbiased_when_scaled() -> None:
    dim, n = 400, 4000
    x = vec(dim, seed=2)
    c = parse_codec("randk:0.25")  # k = 100, kept values scaled by dim/k = 4
    g = rng(12)
    mean = np.zeros(dim)
    for _ in range(n):
        y = c.decode(c.encode(x, g))
        assert np.count_nonzero(y) == 100
        mean += y
    mean /= n
    # Per value: 4x w.p. 1/4 else 0, variance x^2 (dim/k - 1) = 3 x^2. The mean of n draws has
    # sigma = |x| sqrt(3 / n); 5 sigma (about 6e-7 per value under the CLT, n = 4000 is plenty).
    sigma = np.abs(x) * math.sqrt((dim / 100 - 1) / n)
    assert np.all(np.abs(mean - x) <= 5 * sigma + 1e-7)


def test_random_k_unscaled_keeps_values_as_they_are() -> None:
    x = vec(300)
    c = parse_codec("randk:0.1,scaled=false")
    y = c.decode(c.encode(x, rng()))
    kept = np.flatnonzero(y)
    assert kept.size == 30 and not c.is_unbiased
    np.testing.assert_array_equal(y[kept], x[kept])


def test_unbiased_flags() -> None:
    flags = {s: parse_codec(s).is_unbiased for s in ["identity", "int8", "int4", "randk:0.1", "randk:0.1 > int8"]}
    assert all(flags.values())
    assert not any(parse_codec(s).is_unbiased for s in ["fp16", "bf16", "topk:0.1", "topk:0.1 > int8"])


# ---------------------------------------------------------------- error feedback


@pytest.mark.parametrize("spec", ["topk:0.05", "topk:0.1 > int8", "int4:block=64", "randk:0.1,scaled=false > int8"])
def test_error_feedback_carries_exactly_the_residual(spec: str) -> None:
    dim = 2000
    codec = parse_codec(spec)
    ef = ErrorFeedback(codec, dim)
    g = rng(4)
    for t in range(5):
        x = vec(dim, seed=t)
        r_old = ef.residual.copy()
        payload = ef.encode(x, g)
        d = codec.decode(payload, dim)
        # By definition, in float32: r_new = (x + r_old) - decode(payload), bit for bit ...
        np.testing.assert_array_equal(ef.residual, (x + r_old) - d)
        # ... so x + r_old = decode + r_new up to one float32 rounding of each sum.
        lhs = x.astype(np.float64) + r_old
        rhs = d.astype(np.float64) + ef.residual
        assert np.all(np.abs(lhs - rhs) <= 2.0**-23 * (np.abs(lhs) + np.abs(d)))


def test_error_feedback_sum_of_decoded_tracks_sum_of_inputs() -> None:
    # A constant signal plus noise, compressed to its top 10% each round. Without feedback the same
    # large coordinates win every round and the rest of the signal never arrives; with feedback the
    # mean decoded update converges to the signal: sum(decoded) = sum(x) - r_T, r_T stays bounded.
    dim, rounds = 1000, 300
    signal = vec(dim, seed=20)
    codec = parse_codec("topk:0.1 > int8")
    ef = ErrorFeedback(codec, dim)
    g, noise = rng(21), rng(22)
    sent_ef, sent_plain, sent_x = np.zeros(dim), np.zeros(dim), np.zeros(dim)
    for _ in range(rounds):
        x = signal + noise.standard_normal(dim).astype(np.float32) * 0.5
        sent_x += x
        sent_ef += codec.decode(ef.encode(x, g), dim)
        sent_plain += codec.decode(codec.encode(x, g), dim)
    np.testing.assert_allclose(sent_ef + ef.residual, sent_x, atol=1e-3)
    rel = lambda v: np.linalg.norm(v / rounds - signal) / np.linalg.norm(signal)  # noqa: E731
    assert rel(sent_ef) < 0.05, rel(sent_ef)
    assert rel(sent_plain) > 0.5, rel(sent_plain)
    assert np.linalg.norm(ef.residual) < 20 * np.linalg.norm(signal)  # bounded, not growing with T


def test_error_feedback_state_dict_resumes_exactly() -> None:
    codec = parse_codec("topk:0.05 > int4")
    a = ErrorFeedback(codec, 500)
    for t in range(3):
        a.encode(vec(500, seed=t), rng(t))
    b = ErrorFeedback(codec, 500)
    b.load_state_dict(a.state_dict())
    assert a.state_dict()["residual"].dtype == np.float32
    np.testing.assert_array_equal(a.encode(vec(500, 9), rng(9)), b.encode(vec(500, 9), rng(9)))
    with pytest.raises(HierfedError, match=r"residual has shape \(400,\), expected \(500,\)"):
        b.load_state_dict({"residual": np.zeros(400, np.float32)})
    with pytest.raises(HierfedError, match="expected"):
        b.encode(vec(400))


def test_error_feedback_rejects_scaled_random_k() -> None:
    with pytest.raises(HierfedError, match=r"randk:0.1,scaled=false"):
        ErrorFeedback(parse_codec("randk:0.1"), 100)


# ---------------------------------------------------------------- sizes


def expected_size(spec: str, dim: int) -> int:
    """The size formulas of docs/compression.md, written out independently of the codec code."""
    H = 40
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    table = {
        "identity": lambda n: 4 * n,
        "fp16": lambda n: 2 * n,
        "bf16": lambda n: 2 * n,
        "int8": lambda n: n + 8 * ceil(n, 256),
        "int4": lambda n: ceil(n, 2) + 8 * ceil(n, 256),
        "int8:block=64": lambda n: n + 8 * ceil(n, 64),
        "int4:block=7": lambda n: ceil(n, 2) + 8 * ceil(n, 7),
        "int4:block=16": lambda n: ceil(n, 2) + 8 * ceil(n, 16),
    }
    parts = [p.strip() for p in spec.split(">")]
    if parts[0].startswith(("topk", "randk")):
        pct = {"0.05": (5, 100), "0.1": (1, 10), "0.3": (3, 10), "0.5": (1, 2), "0.02": (2, 100), "0.25": (1, 4)}
        num, den = pct[parts[0].split(":")[1].split(",")[0]]
        k = ceil(num * dim, den)
        values = table[parts[1] if len(parts) > 1 else "identity"](k)
        return H + min(4 * k, ceil(dim, 8)) + values
    return H + table[spec](dim)


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("dim", [0, 1, 2, 7, 255, 256, 257, 1000, 4097])
def test_encoded_size_matches_formula(spec: str, dim: int) -> None:
    c = parse_codec(spec)
    payload = c.encode(vec(dim), rng())
    assert payload.dtype == np.uint8 and payload.ndim == 1 and payload.flags.c_contiguous
    assert len(payload) == c.encoded_size(dim) == expected_size(spec, dim)
    assert c.decode(payload, dim).shape == (dim,)


def test_int8_size_by_hand() -> None:
    # 40-byte header + 1000 codes + 4 blocks x (min, step) float32 = 1072.
    assert parse_codec("int8").encoded_size(1000) == 1072
    # top 5% of 1e6 = 50000 values: bitmap (125000 B < 4 x 50000) + 50000 codes + 196 x 8 B.
    assert parse_codec("topk:0.05 > int8").encoded_size(10**6) == 40 + 125_000 + 50_000 + 196 * 8
    # top 1%: indices are cheaper than the bitmap (40000 B < 125000 B).
    assert parse_codec("topk:0.01").encoded_size(10**6) == 40 + 40_000 + 40_000


# ---------------------------------------------------------------- wire format


def test_header_layout_matches_docs() -> None:
    c = parse_codec("int8")
    p = c.encode(vec(1000), rng())
    fields = struct.unpack("<4sHHIIQQII", p[:40].tobytes())  # the byte table in docs/compression.md
    magic, version, hsize, codec_id, body_crc, dim, body_len, reserved, head_crc = fields
    assert (magic, version, hsize, dim, body_len, reserved) == (b"HFCD", 1, 40, 1000, len(p) - 40, 0)
    assert codec_id == zlib.crc32(b"int8:block=256") == c.codec_id
    assert body_crc == zlib.crc32(p[40:].tobytes())
    assert head_crc == zlib.crc32(p[:36].tobytes())
    h = read_header(p)
    assert (h.dim, h.body_len, h.codec_id) == (1000, len(p) - 40, c.codec_id)


@pytest.mark.parametrize("spec", ["int8", "topk:0.1 > int4", "fp16", "randk:0.3"])
def test_every_flipped_byte_is_rejected(spec: str) -> None:
    c = parse_codec(spec)
    p = c.encode(vec(203), rng())
    for i in range(len(p)):
        for flip in (0x01, 0x80, 0xFF):
            bad = p.copy()
            bad[i] ^= flip
            with pytest.raises(CodecError):
                c.decode(bad, 203)


def test_corrupt_body_message() -> None:
    c = parse_codec("int8")
    p = c.encode(vec(100), rng())
    p[HEADER_SIZE + 5] ^= 0x10
    with pytest.raises(CodecError, match="corrupt codec payload: body CRC32"):
        c.decode(p)
    p = c.encode(vec(100), rng())
    p[20] ^= 1  # dim
    with pytest.raises(CodecError, match="header CRC32 mismatch"):
        c.decode(p)


def test_truncated_and_oversized_payloads_are_rejected() -> None:
    c = parse_codec("topk:0.05 > int8")
    p = c.encode(vec(1000), rng())
    with pytest.raises(CodecError, match=r"truncated codec payload: 222 bytes, header says 40 \+ 183 = 223"):
        c.decode(p[:-1])
    with pytest.raises(CodecError, match="truncated codec payload: 10 bytes, shorter than the 40-byte header"):
        c.decode(p[:10])
    with pytest.raises(CodecError, match="oversized"):
        c.decode(np.concatenate([p, np.zeros(3, np.uint8)]))
    with pytest.raises(CodecError, match="truncated"):
        c.decode(b"")


def test_wrong_dim_and_wrong_codec_are_rejected() -> None:
    p = parse_codec("int8").encode(vec(1000), rng())
    with pytest.raises(CodecError, match="payload has dim 1000, expected 999"):
        parse_codec("int8").decode(p, 999)
    with pytest.raises(CodecError, match=r"codec mismatch: payload encoded with int8:block=256 .* expected fp16"):
        parse_codec("fp16").decode(p)
    with pytest.raises(CodecError, match="codec mismatch"):
        parse_codec("int8:block=128").decode(p)  # same name, other block size: another format


def test_not_a_payload() -> None:
    with pytest.raises(CodecError, match="not a hierfed codec payload"):
        parse_codec("identity").decode(np.zeros(100, np.uint8))
    with pytest.raises(CodecError, match="1-D uint8"):
        parse_codec("identity").decode(np.zeros(100, np.float32))


def test_payload_travels_as_any_byte_buffer() -> None:
    c = parse_codec("int4")
    p = c.encode(vec(77), rng())
    for buf in (p, p.tobytes(), bytearray(p.tobytes()), memoryview(p)):
        np.testing.assert_array_equal(c.decode(buf, 77), c.decode(p, 77))


def test_gatherv_style_concatenation_splits_by_encoded_size() -> None:
    # What a parent does after Gatherv: the counts are encoded_size(dim) for every child.
    c, dim = parse_codec("topk:0.1 > int8"), 3001
    xs = [vec(dim, seed=s) for s in range(3)]
    recv = np.concatenate([c.encode(x, rng(s)) for s, x in enumerate(xs)])
    n = c.encoded_size(dim)
    total = sum(c.decode(recv[i * n : (i + 1) * n], dim) for i in range(3))
    assert total.shape == (dim,) and np.count_nonzero(total) >= 301


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(CodecError, match=r"2 non-finite values \(first at index 1"):
        parse_codec("fp16").encode(np.array([0, np.nan, np.inf], np.float32))
    with pytest.raises(CodecError, match="flat vector"):
        parse_codec("fp16").encode(np.zeros((2, 3), np.float32))
    with pytest.raises(CodecError, match="stochastic: encode needs rng"):
        parse_codec("int8").encode(vec(10))


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("spec", ["int8", "int4:block=32", "randk:0.1", "randk:0.2 > int8"])
def test_same_seed_same_bytes(spec: str) -> None:
    c, x = parse_codec(spec), vec(1000)
    a, b = c.encode(x, rng(42)), c.encode(x, rng(42))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c.encode(x, rng(43)))


def test_deterministic_codecs_ignore_rng() -> None:
    for spec in ["fp16", "bf16", "topk:0.1", "identity"]:
        c, x = parse_codec(spec), vec(500)
        np.testing.assert_array_equal(c.encode(x), c.encode(x, rng(1)))
        assert not c.is_stochastic


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "spec,canonical",
    [
        ("identity", "identity"),
        ("fp32", "identity"),
        ("int8", "int8:block=256"),
        ("int8:block=256", "int8:block=256"),
        ("INT4 : block = 64", "int4:block=64"),
        ("topk:5%", "topk:0.05"),
        ("topk:0.050", "topk:0.05"),
        ("topk:1", "topk:1"),
        (" topk:0.05 > int8 ", "topk:0.05>int8:block=256"),
        ("topk:0.1 > identity", "topk:0.1"),
        ("randk:0.1", "randk:0.1,scaled=true"),
        ("randk:10%,scaled=false > int4:block=32", "randk:0.1,scaled=false>int4:block=32"),
    ],
)
def test_canonical_specs(spec: str, canonical: str) -> None:
    c = parse_codec(spec)
    assert c.spec == canonical
    assert c == parse_codec(canonical) and c.codec_id == parse_codec(canonical).codec_id


@pytest.mark.parametrize(
    "spec,why",
    [
        ("gzip", "unknown codec 'gzip'"),
        ("", "empty stage"),
        ("topk:0.05 >", "empty stage"),
        ("topk", "topk takes one fraction"),
        ("topk:0", r"fraction '0' is not in \(0, 1\]"),
        ("topk:1.5", r"fraction '1.5' is not in \(0, 1\]"),
        ("randk:-0.1", r"not in \(0, 1\]"),
        ("topk:150%", r"not in \(0, 1\]"),
        ("topk:abc", "fraction 'abc' is not a number"),
        ("topk:nan", "is not a number"),
        ("topk:0.1 > randk:0.1", "two sparsifiers"),
        ("int8 > topk:0.1", "int8 before the sparsifier"),
        ("int8 > fp16", r"two value codecs \(int8, fp16\)"),
        ("int8:block=0", "block '0' is not a positive integer"),
        ("int8:block=2.5", "block '2.5' is not a positive integer"),
        ("int8:bits=4", "int8 has no option 'bits'"),
        ("fp16:0.5", "fp16 takes no positional argument"),
        ("int8:block=64,block=32", "sets 'block' twice"),
        ("randk:0.1,scaled=maybe", "scaled='maybe' is not true or false"),
        ("topk:0.1,0.2", "topk takes one fraction"),
    ],
)
def test_bad_specs_are_rejected_with_one_line(spec: str, why: str) -> None:
    with pytest.raises(HierfedError, match=why) as e:
        parse_codec(spec)
    msg = str(e.value)
    assert msg.startswith(f"codec spec {spec!r}: ") and "\n" not in msg
    assert not isinstance(e.value, CodecError)  # config errors, not payload errors


def test_codec_error_is_a_hierfed_error() -> None:
    assert issubclass(CodecError, HierfedError)
