"""A Codec is a chain parsed from a spec string: an optional sparsifier, then one value codec.

Grammar (whitespace and case ignored):
    chain := stage (">" stage)*          at most one sparsifier, first; at most one value codec
    stage := name [":" arg ("," arg)*]   arg := value | key=value
    identity | fp32 | fp16 | bf16 | int8[:block=B] | int4[:block=B] | topk:F | randk:F[,scaled=BOOL]
F is a decimal or a percentage in (0, 1] ("0.05", "5%"); B a positive integer (default 256).
The canonical spec (every parameter spelled out, e.g. "topk:0.05>int8:block=256") names the codec
in logs, and its CRC32 is the codec id in every payload's header.
"""

from __future__ import annotations

import zlib
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import numpy as np

from hierfed.comm.codecs.sparse import MAX_SPARSE_DIM, RandK, Sparsifier, TopK
from hierfed.comm.codecs.values import BFloat16, Float16, Identity, StochasticQuantizer, ValueCodec
from hierfed.comm.codecs.wire import HEADER_SIZE, CodecError, as_bytes, check_body, read_header, write_header
from hierfed.errors import HierfedError

DEFAULT_BLOCK = 256
VALUE_CODECS = ("identity", "fp32", "fp16", "bf16", "int8", "int4")
SPARSIFIERS = ("topk", "randk")
_KNOWN: dict[int, str] = {}  # codec id -> canonical spec, for naming a sender's codec in errors


class Codec:
    """Encode a flat float32 vector to a checked uint8 payload and back. Build with `parse_codec`."""

    def __init__(self, sparsifier: Sparsifier | None, values: ValueCodec) -> None:
        self.sparsifier = sparsifier
        self.values = values
        parts = [sparsifier.spec] if sparsifier else []
        if not (sparsifier and isinstance(values, Identity)):  # "topk:0.1>identity" is "topk:0.1"
            parts.append(values.spec)
        self.spec = ">".join(parts)
        self.codec_id = zlib.crc32(self.spec.encode()) & 0xFFFFFFFF
        _KNOWN[self.codec_id] = self.spec
        # Raw float32 in, raw float32 out: the caller may skip encoding and keep the MPI Reduce path.
        self.is_identity = sparsifier is None and isinstance(values, Identity)
        self.is_stochastic = values.stochastic or bool(sparsifier and sparsifier.stochastic)
        self.is_unbiased = values.unbiased and (sparsifier is None or sparsifier.unbiased)

    def __repr__(self) -> str:
        return f"Codec({self.spec!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.spec == self.spec

    def __hash__(self) -> int:
        return hash(self.spec)

    def _count(self, dim: int) -> int:
        return self.sparsifier.k(dim) if self.sparsifier else dim

    def body_size(self, dim: int) -> int:
        index = self.sparsifier.index_size(dim) if self.sparsifier else 0
        return index + self.values.body_size(self._count(dim))

    def encoded_size(self, dim: int) -> int:
        """Exact bytes `encode` produces for a vector of length dim, header included."""
        if dim < 0:
            raise CodecError(f"{self.spec}: dim must be >= 0, got {dim}")
        if self.sparsifier and dim > MAX_SPARSE_DIM:
            raise CodecError(f"{self.spec}: dim {dim} exceeds the uint32 index range of a sparsifier")
        return HEADER_SIZE + self.body_size(dim)

    def encode(self, x: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """The payload for x (cast to float32): a uint8 array of `encoded_size(x.size)` bytes.

        `rng` is required when `is_stochastic` (seed it from (seed, round, client)).
        """
        x = np.asarray(x)
        if x.ndim != 1:
            raise CodecError(f"{self.spec}: encode takes a flat vector, got shape {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        finite = np.isfinite(x)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            first = f"first at index {bad[0]}: {x[bad[0]]}"
            raise CodecError(f"{self.spec}: cannot encode {bad.size} non-finite values ({first})")
        if self.is_stochastic and not isinstance(rng, np.random.Generator):
            raise CodecError(f"{self.spec} is stochastic: encode needs rng=numpy.random.Generator")
        dim = x.size
        out = np.zeros(self.encoded_size(dim), dtype=np.uint8)
        body = out[HEADER_SIZE:]
        if self.sparsifier:
            isize = self.sparsifier.index_size(dim)
            idx, vals = self.sparsifier.select(x, rng)
            self.sparsifier.write_indices(idx, dim, body[:isize])
            self.values.encode_into(vals, body[isize:], rng)
        else:
            self.values.encode_into(x, body, rng)
        write_header(out, self.codec_id, dim)
        return out

    def decode(self, buf, dim: int | None = None) -> np.ndarray:
        """The float32 vector in a payload; CodecError unless header, codec, dim and CRCs all check.

        Pass `dim` to also reject a payload of another length. Sparsifiers give zeros elsewhere.
        """
        b = as_bytes(buf)
        head = read_header(b)
        if head.codec_id != self.codec_id:
            sender = _KNOWN.get(head.codec_id, "an unknown codec")
            raise CodecError(
                f"codec mismatch: payload encoded with {sender} (id {head.codec_id:#010x}), "
                f"expected {self.spec} (id {self.codec_id:#010x})"
            )
        if dim is not None and head.dim != dim:
            raise CodecError(f"{self.spec}: payload has dim {head.dim}, expected {dim}")
        if head.body_len != self.encoded_size(head.dim) - HEADER_SIZE:
            raise CodecError(
                f"corrupt {self.spec} payload: body of {head.body_len} bytes, dim {head.dim} needs "
                f"{self.encoded_size(head.dim) - HEADER_SIZE}"
            )
        body = check_body(b, head)
        n = head.dim
        if self.sparsifier:
            isize = self.sparsifier.index_size(n)
            idx = self.sparsifier.read_indices(body[:isize], n)
            out = np.zeros(n, dtype=np.float32)
            out[idx] = self.values.decode(body[isize:], idx.size)
        else:
            out = self.values.decode(body, n)
        if not np.isfinite(out).all():
            raise CodecError(f"corrupt {self.spec} payload: decodes to non-finite values")
        return out


def _fraction(spec: str, stage: str, text: str) -> Fraction:
    try:
        d = Decimal(text[:-1]) / 100 if text.endswith("%") else Decimal(text)
        f = Fraction(d)
    except (InvalidOperation, ValueError, ArithmeticError):
        raise HierfedError(f"codec spec {spec!r}: {stage} fraction {text!r} is not a number") from None
    if not 0 < f <= 1:
        raise HierfedError(f"codec spec {spec!r}: {stage} fraction {text!r} is not in (0, 1]")
    return f


def _stage(spec: str, text: str) -> Sparsifier | ValueCodec:
    name, _, argtext = text.partition(":")
    args = argtext.split(",") if argtext else []
    pos = [a for a in args if "=" not in a]
    kw: dict[str, str] = {}
    for a in args:
        if "=" in a:
            k, _, v = a.partition("=")
            if k in kw:
                raise HierfedError(f"codec spec {spec!r}: {name} sets {k!r} twice")
            kw[k] = v
    if name not in VALUE_CODECS + SPARSIFIERS:
        known = ", ".join(VALUE_CODECS + SPARSIFIERS)
        raise HierfedError(f"codec spec {spec!r}: unknown codec {name!r} (known: {known})")
    allowed = {"int8": {"block"}, "int4": {"block"}, "randk": {"scaled"}}.get(name, set())
    if unknown := sorted(set(kw) - allowed):
        options = ", ".join(sorted(allowed)) or "none"
        raise HierfedError(f"codec spec {spec!r}: {name} has no option {unknown[0]!r} (options: {options})")
    npos = 1 if name in SPARSIFIERS else 0
    if len(pos) != npos or any(not a for a in pos):
        what = "one fraction, e.g. topk:0.05" if npos else "no positional argument"
        raise HierfedError(f"codec spec {spec!r}: {name} takes {what}, got {argtext!r}")
    if name in ("identity", "fp32"):
        return Identity()
    if name == "fp16":
        return Float16()
    if name == "bf16":
        return BFloat16()
    if name in ("int8", "int4"):
        block = kw.get("block", str(DEFAULT_BLOCK))
        if not block.isdigit() or int(block) < 1:
            raise HierfedError(f"codec spec {spec!r}: {name} block {block!r} is not a positive integer")
        return StochasticQuantizer(int(name[3:]), int(block))
    fraction = _fraction(spec, name, pos[0])
    if name == "topk":
        return TopK(fraction)
    scaled = kw.get("scaled", "true")
    if scaled not in ("true", "false"):
        raise HierfedError(f"codec spec {spec!r}: randk scaled={scaled!r} is not true or false")
    return RandK(fraction, scaled=scaled == "true")


def parse_codec(spec: str) -> Codec:
    """The Codec for a spec such as "int8", "bf16", "topk:0.05 > int8:block=128"; HierfedError if bad."""
    if not isinstance(spec, str):
        raise HierfedError(f"codec spec {spec!r}: must be a string such as 'int8' or 'topk:0.05 > int8'")
    text = "".join(spec.split()).lower()
    parsed = [_stage(spec, s) if s else None for s in text.split(">")]
    stages = [s for s in parsed if s is not None]
    if len(stages) < len(parsed):
        raise HierfedError(f"codec spec {spec!r}: empty stage (write e.g. 'topk:0.05 > int8')")
    sparse = [i for i, s in enumerate(stages) if isinstance(s, Sparsifier)]
    values = [s for s in stages if isinstance(s, ValueCodec)]
    if len(sparse) > 1:
        raise HierfedError(f"codec spec {spec!r}: two sparsifiers; a chain has at most one")
    if len(values) > 1:
        names = f"{values[0].name}, {values[1].name}"
        raise HierfedError(f"codec spec {spec!r}: two value codecs ({names}); a chain has at most one")
    if sparse and sparse[0] != 0:
        raise HierfedError(f"codec spec {spec!r}: {stages[0].name} before the sparsifier; the sparsifier comes first")
    first = stages[0]
    return Codec(first if isinstance(first, Sparsifier) else None, values[0] if values else Identity())  # a sparsifier comes first
