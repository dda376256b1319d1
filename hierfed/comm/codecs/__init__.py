"""Codecs for flat float32 updates: pure numpy, no MPI (see docs/compression.md).

    codec = parse_codec("topk:0.05 > int8")        # HierfedError for a bad spec
    buf = codec.encode(delta, rng)                 # uint8 array, len == codec.encoded_size(dim)
    delta_hat = codec.decode(buf, dim)             # CodecError if corrupt/truncated/mismatched
    ef = ErrorFeedback(codec, dim); buf = ef.encode(delta, rng)   # per sender, checkpointable

`codec.is_identity` means the payload is plain float32: callers may keep the MPI Reduce path.
`rng` (a numpy Generator seeded from (seed, round, client)) is needed when `codec.is_stochastic`.
"""

from hierfed.comm.codecs.chain import DEFAULT_BLOCK, Codec, parse_codec
from hierfed.comm.codecs.feedback import ErrorFeedback
from hierfed.comm.codecs.wire import HEADER_SIZE, CodecError, Header, read_header

__all__ = [
    "DEFAULT_BLOCK", "HEADER_SIZE", "Codec", "CodecError", "ErrorFeedback", "Header", "parse_codec", "read_header",
]  # fmt: skip
