#!/usr/bin/python3
"""Writes tests/data/gguf/types.gguf: a small GGUF v3 file written independently of mamba.cpp's
writer (struct + numpy, following ggml's docs/gguf.md), for the reader's tests and as a fuzz seed.

Metadata: one value of every scalar type, a string, arrays of int32 / float32 / strings.
Tensors (values chosen so that each type holds them exactly; the test rebuilds them):
  f32  (3, 5)  F32   v[i] = i * 0.25 - 1
  f16  (2, 4)  F16   v[i] = i * 0.5 - 2
  bf16 (4,)    BF16  v[i] = i - 1.5
  q8   (2, 32) Q8_0  block b: d = 2^-(b+1); q[j] = j - 16        -> v = d * (j - 16)
  q4   (1, 64) Q4_0  block b: d = 0.5 * (b + 1); nibble n_j = j % 16 -> v = d * (n_j - 8),
                     value j < 16 in the low nibble of byte j, value j >= 16 in the high nibble
                     of byte j - 16
  q4k  (1, 256) Q4_K, all-zero block (the test also retypes it to Q2_K, which is refused)
"""
import struct
import sys

import numpy as np

ALIGN = 32


def s(x):
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key, t, payload):
    return s(key) + struct.pack("<I", t) + payload


meta = [
    kv("general.architecture", 8, s("fixture")),
    kv("u8", 0, struct.pack("<B", 200)),
    kv("i8", 1, struct.pack("<b", -100)),
    kv("u16", 2, struct.pack("<H", 60000)),
    kv("i16", 3, struct.pack("<h", -30000)),
    kv("u32", 4, struct.pack("<I", 4000000000)),
    kv("i32", 5, struct.pack("<i", -2000000000)),
    kv("f32", 6, struct.pack("<f", 0.5)),
    kv("bool", 7, struct.pack("<B", 1)),
    kv("u64", 10, struct.pack("<Q", 1 << 40)),
    kv("i64", 11, struct.pack("<q", -(1 << 40))),
    kv("f64", 12, struct.pack("<d", 0.25)),
    kv("arr.i32", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, -2, 3)),
    kv("arr.f32", 9, struct.pack("<IQ", 6, 2) + struct.pack("<2f", 1.5, -0.5)),
    kv("arr.str", 9, struct.pack("<IQ", 8, 2) + s("a b") + s("\u00e9")),
]


def f16(x):
    return np.float16(x).tobytes()


tensors = []  # (name, ne (fastest first), type, bytes)
tensors.append(("f32", (5, 3), 0, (np.arange(15, dtype=np.float32) * 0.25 - 1).tobytes()))
tensors.append(("f16", (4, 2), 1, (np.arange(8) * 0.5 - 2).astype(np.float16).tobytes()))
bf = (np.arange(4, dtype=np.float32) - 1.5).view(np.uint32) >> 16
tensors.append(("bf16", (4,), 30, bf.astype(np.uint16).tobytes()))
q8 = b""
for b in range(2):
    q8 += f16(2.0 ** -(b + 1)) + bytes((j - 16) & 0xFF for j in range(32))
tensors.append(("q8", (32, 2), 8, q8))
q4 = b""
for b in range(2):
    nib = [j % 16 for j in range(32)]
    q4 += f16(0.5 * (b + 1)) + bytes(nib[j] | (nib[j + 16] << 4) for j in range(16))
tensors.append(("q4", (64, 1), 2, q4))
tensors.append(("q4k", (256, 1), 12, bytes(144)))

infos = b""
off = 0
offs = []
for name, ne, t, data in tensors:
    infos += s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", n) for n in ne)
    infos += struct.pack("<IQ", t, off)
    offs.append(off)
    off += (len(data) + ALIGN - 1) // ALIGN * ALIGN
head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)) + b"".join(meta) + infos
head += bytes((-len(head)) % ALIGN)
body = b""
for (name, ne, t, data), o in zip(tensors, offs):
    assert len(body) == o
    body += data + bytes((-len(data)) % ALIGN)
out = sys.argv[1] if len(sys.argv) > 1 else "tests/data/gguf/types.gguf"
open(out, "wb").write(head + body)
print(out, len(head + body), "bytes")
