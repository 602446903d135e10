#!/usr/bin/env python3
"""Writes the committed seed corpora of the fuzz targets (fuzz/corpus/<target>/).

Run it only to change the seeds; fuzz/run uses the committed files. Deterministic: the same files
every time.

safetensors: small but complete layer states as bnorm and torch write them (F32/F64, prefixes,
metadata, affine/tracked variants), and the format's corners (empty file, scalar, zero-size tensor,
padding, unknown dtype, overlapping offsets, a hole, a truncated buffer, deep nesting).
functional: byte strings of several lengths; the target decodes any bytes into a call.
idx: small valid IDX files and each kind of broken header (magic, type, zero or huge dims, size).
Files named regression-* are inputs that once failed (kept by hand, never removed here).
"""
import json
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def image(tensors, metadata=None, pad=True, raw_header=None):
    """tensors: list of (name, dtype, shape, bytes) in data order."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, dtype, shape, blob in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    text = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def f32(values):
    return struct.pack("<%df" % len(values), *values)


def f64(values):
    return struct.pack("<%dd" % len(values), *values)


def i64(v):
    return struct.pack("<q", v)


def layer(C, prefix="", pack=f32, dtype="F32", affine=True, track=True, nbt=3):
    t = []
    if affine:
        t.append((prefix + "bias", dtype, [C], pack([0.25 * i - 0.5 for i in range(C)])))
    if track:
        t.append((prefix + "num_batches_tracked", "I64", [], i64(nbt)))
        t.append((prefix + "running_mean", dtype, [C], pack([0.1 * i for i in range(C)])))
        t.append((prefix + "running_var", dtype, [C], pack([1.0 + 0.5 * i for i in range(C)])))
    if affine:
        t.append((prefix + "weight", dtype, [C], pack([1.0 + 0.125 * i for i in range(C)])))
    return t


def safetensors_seeds():
    s = {}
    s["layer_f32"] = image(layer(3), {"format": "pt"})
    s["layer_f64_prefix"] = image(layer(4, "features.1.", f64, "F64"), {"format": "pt"})
    s["layer_no_affine"] = image(layer(2, affine=False))
    s["layer_not_tracked"] = image(layer(5, "bn.", track=False))
    s["layer_bare"] = image([], {"format": "pt"})
    s["two_layers"] = image(layer(2, "a.") + layer(3, "b.", f64, "F64"))
    s["negative_var"] = image(layer(2)[:3] + [("running_var", "F32", [2], f32([1.0, -1.0]))] + layer(2)[4:])
    s["negative_nbt"] = image([(n, d, sh, i64(-1) if d == "I64" else b) for n, d, sh, b in layer(2)])
    s["nan_values"] = image(layer(2, pack=lambda v: f32([float("nan")] * len(v))))
    s["scalar_and_zero_size"] = image([("empty", "F32", [0, 5], b""), ("scalar", "I64", [], i64(7))])
    s["all_dtypes"] = image([(d, d, [2], b"\x01" * (2 * n)) for d, n in
                             [("BOOL", 1), ("U8", 1), ("I8", 1), ("U16", 2), ("I16", 2), ("F16", 2), ("BF16", 2),
                              ("U32", 4), ("I32", 4), ("U64", 8), ("F64", 8)]])
    s["no_padding"] = image(layer(1), pad=False)
    s["empty_file"] = b""
    s["short"] = b"\x08\x00\x00"
    s["header_only"] = struct.pack("<Q", 2) + b"{}"
    s["unknown_dtype"] = image([("x", "F8", [1], b"\x00")])
    hdr = b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}'
    s["overlap"] = struct.pack("<Q", len(hdr)) + hdr + b"\x00\x01\x02"
    hdr = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    s["hole"] = struct.pack("<Q", len(hdr)) + hdr + b"\x00\x01"
    s["truncated"] = image(layer(3))[:-5]
    hdr = b'{"a":{"dtype":"U8","shape":[[[1]]],"data_offsets":[0,1]}}'
    s["deep"] = struct.pack("<Q", len(hdr)) + hdr + b"\x00"
    hdr = b'{"a":{"dtype":"U8","shape":[4294967296,4294967296,16],"data_offsets":[0,0]}}'
    s["huge_shape"] = struct.pack("<Q", len(hdr)) + hdr
    hdr = b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
    s["duplicate_key"] = struct.pack("<Q", len(hdr)) + hdr + b"\x00"
    s["escaped_names"] = image([("w\u00e9ight\\u", "F32", [1], f32([1.0])), ("\u0000", "U8", [0], b"")])
    return s


def functional_seeds():
    rng = random.Random(20240611)
    s = {}
    for i, n in enumerate([16, 48, 64, 96, 128, 200, 256, 384, 512, 768, 1024, 1536, 2048, 3000, 4096, 6000]):
        s["random_%02d_%d" % (i, n)] = bytes(rng.randrange(256) for _ in range(n))
    for i in range(8):  # mostly zeros with a random tail: the end of the input drives the options
        s["zeros_tail_%d" % i] = bytes(200 * i) + bytes(rng.randrange(256) for _ in range(64))
    return s


def idx_image(dims, data=None):
    n = 1
    for x in dims:
        n *= x
    if data is None:
        data = bytes((i * 37) % 256 for i in range(n))
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", x) for x in dims) + data


def idx_seeds():
    """IDX files as Fashion-MNIST has them (labels, images) and each way a header can be wrong."""
    return {
        "labels": idx_image([10], bytes(range(10))),
        "images": idx_image([2, 28, 28]),
        "rank3_small": idx_image([3, 2, 2]),
        "short_data": idx_image([4, 4])[:-3],
        "long_data": idx_image([2, 2]) + b"\x01",
        "bad_magic": b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00",
        "bad_type": b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00",
        "zero_dim": b"\x00\x00\x08\x02" + struct.pack(">II", 0, 5),
        "truncated_header": b"\x00\x00\x08\x03\x00\x00",
        "huge": b"\x00\x00\x08\x03" + struct.pack(">III", 0xFFFFFFFF, 0xFFFFFFFF, 4),
        "empty": b"",
    }


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name in os.listdir(d):
        if not name.startswith("regression-"):  # inputs of failures found by fuzzing stay
            os.remove(os.path.join(d, name))
    for name, blob in sorted(seeds.items()):
        with open(os.path.join(d, name), "wb") as f:
            f.write(blob)


if __name__ == "__main__":
    write("fuzz_safetensors", safetensors_seeds())
    write("fuzz_functional", functional_seeds())
    write("fuzz_idx", idx_seeds())
