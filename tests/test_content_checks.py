"""store.content_check against files written by the formats' own writers (safetensors, gguf, torch, onnx, zip)."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from comfy_autocloud.store.content_check import _GGML_BLOCKS, content_problem, describe, format_of

HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not found</body></html>\n"
LFS = (b"version https://git-lfs.github.com/spec/v1\n"
       b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _cut(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    return _write(path.with_name("cut-" + path.name), data[:keep])


@pytest.fixture
def st_file(tmp_path: Path) -> Path:
    from safetensors.numpy import save_file

    path = tmp_path / "m.safetensors"
    save_file({"a": np.arange(1000, dtype=np.float32), "b": np.ones((4, 8), dtype=np.float16),
               "c": np.zeros(3, dtype=np.int64)}, str(path), metadata={"format": "pt"})
    return path


def test_safetensors_valid_truncated_extended_and_garbage(st_file: Path) -> None:
    assert content_problem(st_file, "m.safetensors") is None
    assert content_problem(st_file, "renamed.SFT") is None
    cut = content_problem(_cut(st_file, st_file.stat().st_size - 1), "m.safetensors")
    assert cut is not None and cut.startswith("a broken safetensors file: it is truncated") and "cut short" in cut
    longer = _write(st_file.with_name("long.safetensors"), st_file.read_bytes() + b"\0" * 16)
    assert "16 bytes after the last tensor" in (content_problem(longer, "long.safetensors") or "")
    (n,) = struct.unpack("<Q", st_file.read_bytes()[:8])
    header_cut = content_problem(_cut(st_file, 8 + n // 2), "m.safetensors")
    assert header_cut is not None and "cut short" in header_cut
    huge = _write(st_file.with_name("huge.safetensors"), struct.pack("<Q", 2**40) + b"{}")
    assert "header too large" in (content_problem(huge, "huge.safetensors") or "")
    # a header whose offsets leave a hole between tensors
    header = json.dumps({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                         "b": {"dtype": "U8", "shape": [4], "data_offsets": [8, 12]}}).encode()
    holey = _write(st_file.with_name("holey.safetensors"), struct.pack("<Q", len(header)) + header + b"x" * 12)
    assert "does not follow on" in (content_problem(holey, "holey.safetensors") or "")
    wrong = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 4]}}).encode()
    lying = _write(st_file.with_name("lying.safetensors"), struct.pack("<Q", len(wrong)) + wrong + b"x" * 4)
    assert "shape and dtype need 16" in (content_problem(lying, "lying.safetensors") or "")


@pytest.mark.parametrize("body, ctype, expect", [
    (HTML, "text/html; charset=utf-8", "an HTML page (text/html, {n} bytes), not a safetensors file"),
    (HTML, None, "an HTML page ({n} bytes), not a safetensors file"),
    (LFS, "text/plain", "a Git LFS pointer (text/plain, {n} bytes), not a safetensors file: "
                        "the URL serves the pointer, not the file"),
    (b'{"error": "Unauthorized", "detail": "token expired"}', "application/json",
     "a JSON document (application/json, {n} bytes), not a safetensors file"),
    (b"<?xml version=\"1.0\"?><Error><Code>AccessDenied</Code></Error>", "application/xml",
     "an XML document (application/xml, {n} bytes), not a safetensors file"),
    (b"", None, "an empty body (0 bytes), not a safetensors file"),
    (b"Rate limit exceeded, try again later\n", None, "a text document ({n} bytes), not a safetensors file"),
])
def test_what_arrived_instead_is_named(tmp_path: Path, body: bytes, ctype: str | None, expect: str) -> None:
    path = _write(tmp_path / "x.safetensors", body)
    assert content_problem(path, "x.safetensors", ctype) == expect.format(n=len(body))


def test_unknown_formats_pass_whatever_they_hold(tmp_path: Path) -> None:
    for name in ("config.json", "model.bin", "vocab.txt", "weights.yaml", "noext"):
        assert format_of(name) is None
        assert content_problem(_write(tmp_path / name, HTML), name) is None
    assert content_problem(_write(tmp_path / "e.bin", b""), "e.bin") is None


def test_gguf_written_by_the_gguf_package(tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("some.floats", [1.0, 2.0, 3.0])
    w.add_uint32("some.count", 7)
    w.add_tensor("w1", np.arange(64, dtype=np.float32).reshape(8, 8))
    w.add_tensor("w2", np.ones(100, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    size = path.stat().st_size
    assert content_problem(path, "m.gguf") is None
    assert content_problem(_cut(path, size - 10), "m.gguf") is None  # only the alignment padding went
    cut = content_problem(_cut(path, size - 40), "m.gguf")
    assert cut is not None and "truncated: tensor 'w2'" in cut
    assert "cut short" in (content_problem(_cut(path, 60), "m.gguf") or "")
    assert content_problem(_write(tmp_path / "h.gguf", HTML), "h.gguf") == \
        f"an HTML page ({len(HTML)} bytes), not a GGUF file"
    assert "GGUF magic" in (content_problem(_write(tmp_path / "z.gguf", b"\0" * 64), "z.gguf") or "")


def test_ggml_block_table_matches_the_gguf_package() -> None:
    gguf = pytest.importorskip("gguf")
    reference = {int(k): tuple(v) for k, v in gguf.GGML_QUANT_SIZES.items()}
    assert {k: v for k, v in _GGML_BLOCKS.items() if k in reference} == \
        {k: v for k, v in reference.items() if k in _GGML_BLOCKS}
    assert len(_GGML_BLOCKS) >= 30


def test_torch_checkpoints_zip_and_legacy_pickle(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    state = {"w": torch.arange(5000, dtype=torch.float32), "b": torch.zeros(3)}
    new, old = tmp_path / "m.pt", tmp_path / "old.ckpt"
    torch.save(state, new)
    torch.save(state, old, _use_new_zipfile_serialization=False)
    assert content_problem(new, "m.pt") is None and content_problem(new, "m.pth") is None
    assert content_problem(old, "old.ckpt") is None
    cut = content_problem(_cut(new, new.stat().st_size - 100), "m.ckpt")
    assert cut is not None and cut.startswith("a broken PyTorch checkpoint file") and "cut short" in cut
    assert content_problem(_write(tmp_path / "h.ckpt", HTML), "h.ckpt", "text/html") == \
        f"an HTML page (text/html, {len(HTML)} bytes), not a PyTorch checkpoint file"
    junk = _write(tmp_path / "junk.pth", bytes(range(256)) * 4)
    assert "neither a zip (torch.save) nor a pickle" in (content_problem(junk, "junk.pth") or "")


def test_onnx_model_written_by_onnx(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((16, 16), dtype=np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "tiny",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 16])], [weight])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, producer_name="test"), str(path))
    assert content_problem(path, "m.onnx") is None
    cut = content_problem(_cut(path, path.stat().st_size - 7), "m.onnx")
    assert cut is not None and "truncated" in cut
    assert content_problem(_write(tmp_path / "h.onnx", HTML), "h.onnx") == \
        f"an HTML page ({len(HTML)} bytes), not an ONNX file"


def test_archives(tmp_path: Path) -> None:
    path = tmp_path / "pack.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "hello" * 1000)
        zf.writestr("b.bin", bytes(range(256)) * 100)
    assert content_problem(path, "pack.zip") is None
    assert "not a complete zip archive" in (content_problem(_cut(path, path.stat().st_size - 30), "pack.zip") or "")
    assert content_problem(_write(tmp_path / "p.tar.gz", b"\x1f\x8b\x08\0rest"), "p.tar.gz") is None
    assert content_problem(_write(tmp_path / "e.zip", LFS), "e.zip") == \
        f"a Git LFS pointer ({len(LFS)} bytes), not a zip file: the URL serves the pointer, not the file"


def test_describe_leaves_binary_data_alone() -> None:
    assert describe(bytes(range(256)), 256) is None
    assert describe(b"\x89PNG\r\n\x1a\n" + bytes(100), 108) is None
