#!/usr/bin/python3
"""Writes the PyTorch-checkpoint and .npy fixtures under tests/data/torch/ (run once; commit
the outputs; CI never needs torch or numpy).

Needs Debian's python3-torch and python3-numpy (apt-get install python3-torch python3-numpy)
and runs with /usr/bin/python3:

    /usr/bin/python3 scripts/make_torch_fixture.py

Outputs (all small):
  lm_mamba1.bin        torch.save of the golden lm_mamba1 state dict (fp32), with lm_head.weight
                       sharing the embedding's storage as in mamba_ssm's tied models
  mixed.bin            float16 / bfloat16 / float64 / int64 / bool tensors, a transposed
                       (non-contiguous) view, a view with a storage offset, a shared storage,
                       and an nn.Parameter (pickled through _rebuild_parameter)
  mixed_expected.json  what mixed.bin must load to: per tensor, dtype, shape and the values
                       as fp32 bit patterns (float tensors) or integers
  evil_os_system.bin   a torch-style zip whose data.pkl calls os.system   (must be refused)
  evil_eval.bin        the same with builtins.eval                         (must be refused)
  compressed.bin       a real state dict re-zipped with deflate            (must be refused)
  wrong_storage_size.bin  a storage entry 4 bytes shorter than the pickle says (refused)
  npy_f32_2x3.npy, npy_i64_3.npy, npy_i32_2x2.npy, npy_f32_v2.npy  written by numpy.save
  npy_expected.json    their contents
The safetensors file is parsed here with json + struct, so no safetensors package is needed.
"""
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "torch")
GOLDEN = os.path.join(ROOT, "tests", "data", "golden")


def read_safetensors(path):
    with open(path, "rb") as f:
        b = f.read()
    (n,) = struct.unpack("<Q", b[:8])
    header = json.loads(b[8 : 8 + n])
    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        raw = bytearray(b[8 + n + lo : 8 + n + hi])
        t = torch.frombuffer(raw, dtype=dtypes[info["dtype"]]) if raw else torch.empty(0)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def f32_bits(t):
    return [int(v) for v in t.detach().to(torch.float32).contiguous().view(torch.int32).reshape(-1).tolist()]


def rezip(src, dst, transform):
    """Copies a zip entry by entry, letting transform(name, data) -> (data, compress_type)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data, ctype = transform(info.filename, zin.read(info.filename))
            zout.writestr(zipfile.ZipInfo(info.filename), data, compress_type=ctype)


class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


def evil_zip(path, payload):
    pkl = pickle.dumps(payload, protocol=2)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/version", "3\n")


def main():
    os.makedirs(OUT, exist_ok=True)
    print("torch", torch.__version__, "numpy", np.__version__, file=sys.stderr)

    # 1. the golden Mamba-1 LM, fp32, embedding and lm_head sharing one storage
    sd = read_safetensors(os.path.join(GOLDEN, "lm_mamba1_ckpt", "model.safetensors"))
    state = dict(sd)
    state["lm_head.weight"] = state["backbone.embedding.weight"]  # tied: same storage
    torch.save(state, os.path.join(OUT, "lm_mamba1.bin"))

    # 2. mixed dtypes and views
    sd2 = read_safetensors(os.path.join(GOLDEN, "lm_mamba2_ckpt", "model.safetensors"))
    names = sorted(sd2)
    small = [n for n in names if sd2[n].numel() <= 512]
    a, b, c = small[0], small[1], small[2]
    big = sd2["backbone.layers.0.mixer.out_proj.weight"]  # (64, 128)
    base = big[:16, :24].contiguous()
    mixed = {
        "f16": sd2[a].to(torch.float16),
        "bf16": sd2[b].to(torch.bfloat16),
        "f64": sd2[c].to(torch.float64),
        "transposed": base.t(),  # (24, 16), stride (1, 24)
        "offset_view": base[5:9],  # storage offset 5 * 24
        "shared_a": base,
        "i64": torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4),
        "flags": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(sd2[a].clone()),
    }
    mixed["shared_b"] = mixed["shared_a"]
    torch.save(mixed, os.path.join(OUT, "mixed.bin"))
    expected = {}
    for k, t in mixed.items():
        t = t.detach()
        e = {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
        if t.is_floating_point():
            e["f32_bits"] = f32_bits(t)
        else:
            e["values"] = [int(v) for v in t.reshape(-1).tolist()]
        expected[k] = e
    with open(os.path.join(OUT, "mixed_expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)

    # 3. hostile files
    evil_zip(os.path.join(OUT, "evil_os_system.bin"), {"w": Evil(os.system, "echo pwned")})
    evil_zip(os.path.join(OUT, "evil_eval.bin"), Evil(eval, "__import__('os').system('echo pwned')"))
    small_sd = {"w": sd2[a].clone()}
    buf = io.BytesIO()
    torch.save(small_sd, buf)
    tmp = os.path.join(OUT, "_tmp.bin")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    rezip(tmp, os.path.join(OUT, "compressed.bin"), lambda n, d: (d, zipfile.ZIP_DEFLATED))
    rezip(tmp, os.path.join(OUT, "wrong_storage_size.bin"),
          lambda n, d: (d[:-4] if "/data/" in n else d, zipfile.ZIP_STORED))
    os.remove(tmp)

    # 4. .npy files written by numpy itself
    arrays = {
        "npy_f32_2x3.npy": np.array([[1.5, -2.0, 3.25], [0.0, 1e-8, -7.0]], dtype="<f4"),
        "npy_i64_3.npy": np.array([0, -1, 50279], dtype="<i8"),
        "npy_i32_2x2.npy": np.array([[1, 2], [-3, 2147483647]], dtype="<i4"),
    }
    npexp = {}
    for fname, arr in arrays.items():
        np.save(os.path.join(OUT, fname), arr)
        npexp[fname] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "values": arr.reshape(-1).tolist()}
    v2 = np.arange(6, dtype="<f4").reshape(1, 2, 3)
    with open(os.path.join(OUT, "npy_f32_v2.npy"), "wb") as f:
        np.lib.format.write_array(f, v2, version=(2, 0))
    npexp["npy_f32_v2.npy"] = {"dtype": "<f4", "shape": [1, 2, 3], "values": v2.reshape(-1).tolist()}
    with open(os.path.join(OUT, "npy_expected.json"), "w") as f:
        json.dump(npexp, f, indent=1, sort_keys=True)
    for fn in sorted(os.listdir(OUT)):
        print(fn, os.path.getsize(os.path.join(OUT, fn)), file=sys.stderr)


if __name__ == "__main__":
    main()
