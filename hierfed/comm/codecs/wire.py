"""The checked wire format every codec payload travels in: a 40-byte header, then the body.

Offset  Size  Type     Field
 0      4     bytes    magic b"HFCD"
 4      2     u16      format version (1)
 6      2     u16      header size (40)
 8      4     u32      codec id: CRC32 of the canonical codec spec (UTF-8)
12      4     u32      CRC32 of the body
16      8     u64      dim: length of the float32 vector that was encoded
24      8     u64      body length in bytes
32      4     u32      reserved, 0
36      4     u32      CRC32 of header bytes 0..35
All integers little-endian. A payload is exactly header + body: nothing before, nothing after.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from hierfed.errors import HierfedError

MAGIC = b"HFCD"
VERSION = 1
_HEADER = struct.Struct("<4sHHIIQQII")
HEADER_SIZE = _HEADER.size  # 40: keeps the body 8-byte aligned inside the payload
_CHECKED = HEADER_SIZE - 4  # the header CRC covers every byte before it


class CodecError(HierfedError):
    """A payload that cannot be decoded (corrupt, truncated, wrong codec or dim), or an input
    that cannot be encoded (non-finite values, out of a format's range). One-line message."""


def crc32(data: np.ndarray) -> int:
    # numpy's stubs give ndarray the buffer protocol (__buffer__) only from Python 3.12
    return zlib.crc32(memoryview(np.ascontiguousarray(data)).cast("B")) & 0xFFFFFFFF  # type: ignore[arg-type]


@dataclass(frozen=True)
class Header:
    codec_id: int
    body_crc: int
    dim: int
    body_len: int


def as_bytes(buf) -> np.ndarray:
    """A 1-D uint8 view of a payload: numpy uint8 array, bytes, bytearray or memoryview."""
    if isinstance(buf, np.ndarray):
        if buf.dtype != np.uint8 or buf.ndim != 1:
            raise CodecError(f"a codec payload is a 1-D uint8 array, got {buf.dtype} with shape {buf.shape}")
        return buf
    try:
        return np.frombuffer(buf, dtype=np.uint8)
    except TypeError as e:
        raise CodecError(f"a codec payload is a byte buffer, got {type(buf).__name__}") from e


def write_header(out: np.ndarray, codec_id: int, dim: int) -> None:
    """Fill out[:HEADER_SIZE] for the body already written at out[HEADER_SIZE:]."""
    body = out[HEADER_SIZE:]
    head = _HEADER.pack(MAGIC, VERSION, HEADER_SIZE, codec_id, crc32(body), dim, body.size, 0, 0)
    head = head[:_CHECKED] + struct.pack("<I", zlib.crc32(head[:_CHECKED]) & 0xFFFFFFFF)
    out[:HEADER_SIZE] = np.frombuffer(head, dtype=np.uint8)


def read_header(buf) -> Header:
    """Parse and check the header alone (magic, version, size, header CRC, reserved, length).

    The body's CRC is checked by `check_body`; codec and dim by the Codec that decodes.
    """
    b = as_bytes(buf)
    if b.size < HEADER_SIZE:
        raise CodecError(f"truncated codec payload: {b.size} bytes, shorter than the {HEADER_SIZE}-byte header")
    raw = b[:HEADER_SIZE].tobytes()
    magic, version, hsize, codec_id, body_crc, dim, body_len, reserved, head_crc = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise CodecError(f"not a hierfed codec payload: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CodecError(f"codec wire format version {version} is not supported (this build reads {VERSION})")
    if zlib.crc32(raw[:_CHECKED]) & 0xFFFFFFFF != head_crc:
        raise CodecError("corrupt codec payload: header CRC32 mismatch")
    if hsize != HEADER_SIZE or reserved != 0:
        raise CodecError(f"corrupt codec payload: header size {hsize}, reserved {reserved} (expected {HEADER_SIZE}, 0)")
    if b.size != HEADER_SIZE + body_len:
        what = "truncated" if b.size < HEADER_SIZE + body_len else "oversized"
        raise CodecError(
            f"{what} codec payload: {b.size} bytes, header says {HEADER_SIZE} + {body_len} = {HEADER_SIZE + body_len}"
        )
    return Header(codec_id=codec_id, body_crc=body_crc, dim=dim, body_len=body_len)


def check_body(buf: np.ndarray, header: Header) -> np.ndarray:
    """The body of a payload whose header was read, after checking its CRC32."""
    body = buf[HEADER_SIZE:]
    got = crc32(body)
    if got != header.body_crc:
        raise CodecError(f"corrupt codec payload: body CRC32 {got:#010x}, header says {header.body_crc:#010x}")
    return body
