"""Infotext formatting and PNG "parameters" chunks, as the web UI writes and reads them."""

from __future__ import annotations

import errno
import io
import os
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from runtime.images import metadata
from runtime.images.metadata import format_infotext, png_bytes, quote, read_infotext, save_png

EXAMPLE_PARAMS = {
    "Steps": 28,
    "Sampler": "Euler a",
    "CFG scale": 11,
    "Seed": 114514,
    "Size": "512x512",
    "Model": "acertainthing",
    "Clip skip": 2,
}
EXAMPLE_TEXT = (
    "masterpiece, best quality, 1girl\n"
    "Negative prompt: lowres\n"
    "Steps: 28, Sampler: Euler a, CFG scale: 11, Seed: 114514, Size: 512x512, "
    "Model: acertainthing, Clip skip: 2"
)


def small_image(mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (8, 6), color=(10, 200, 30) if mode == "RGB" else 128)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk of a PNG."""
    chunks, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        chunks.append((kind, data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def test_example_infotext() -> None:
    assert format_infotext("masterpiece, best quality, 1girl", "lowres", EXAMPLE_PARAMS) == EXAMPLE_TEXT


def test_known_keys_follow_the_web_uis_order_whatever_the_input_order() -> None:
    shuffled = dict(reversed(list(EXAMPLE_PARAMS.items())))
    assert format_infotext("masterpiece, best quality, 1girl", "lowres", shuffled) == EXAMPLE_TEXT


def test_negative_prompt_line_only_when_there_is_one() -> None:
    assert format_infotext("a cat", "", {"Steps": 20}) == "a cat\nSteps: 20"


def test_full_order_with_extras_and_version() -> None:
    params = {
        "Version": "v1.10.1",
        "Emphasis": "No norm",
        "RNG": "CPU",
        "ENSD": 31337,
        "Clip skip": 2,
        "Denoising strength": 0.7,
        "Variation seed": 5,
        "VAE": "anything.vae.pt",
        "VAE hash": "f921fb3f29",
        "Model": "acertainthing",
        "Model hash": "866946d1a5",
        "Size": "512x768",
        "Seed": 1,
        "CFG scale": 7.0,
        "Schedule type": "Karras",
        "Sampler": "DPM++ 2M",
        "Steps": 20,
        "Hires upscaler": "Latent",
    }
    assert format_infotext("p", "n", params).splitlines()[2] == (
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 1, Size: 512x768, "
        "Model hash: 866946d1a5, Model: acertainthing, VAE hash: f921fb3f29, VAE: anything.vae.pt, "
        "Variation seed: 5, Denoising strength: 0.7, Clip skip: 2, ENSD: 31337, RNG: CPU, "
        "Emphasis: No norm, Hires upscaler: Latent, Version: v1.10.1"
    )


@pytest.mark.parametrize(
    ("params", "line"),
    [
        ({"Steps": 20, "Seed": None}, "Steps: 20"),
        ({"Steps": 20, "Clip skip": 1}, "Steps: 20"),
        ({"Steps": 20, "Clip skip": 0}, "Steps: 20"),
        ({"Steps": 20, "Clip skip": 3}, "Steps: 20, Clip skip: 3"),
        ({"Steps": 20, "RNG": "GPU"}, "Steps: 20"),
        ({"Steps": 20, "RNG": "NV"}, "Steps: 20, RNG: NV"),
        ({"Steps": 20, "ENSD": 0}, "Steps: 20"),
        ({"Steps": 20, "Tiling": "Tiling"}, "Steps: 20, Tiling"),  # a value equal to its key
    ],
)
def test_what_is_left_out(params: dict[str, object], line: str) -> None:
    assert format_infotext("p", "", params) == f"p\n{line}"


def test_quoting_follows_the_web_ui() -> None:
    assert quote("Euler a") == "Euler a"
    assert quote("a, b") == '"a, b"'
    assert quote("x: y") == '"x: y"'
    assert quote("two\nlines") == '"two\\nlines"'
    assert quote('say "hi", ok') == '"say \\"hi\\", ok"'
    assert quote('a "b"') == 'a "b"'  # a quote alone does not trigger quoting there either
    assert quote("日本, 語") == '"日本, 語"'  # ensure_ascii=False
    assert quote(7) == "7"
    params = {"Steps": 20, "Hires upscaler": "4x-UltraSharp, v2", "Lora hashes": "a: 1234"}
    assert format_infotext("p", "", params) == (
        'p\nSteps: 20, Hires upscaler: "4x-UltraSharp, v2", Lora hashes: "a: 1234"'
    )


def test_prompt_text_is_written_as_is_and_the_whole_text_stripped() -> None:
    text = format_infotext("  (cat:1.2), dog \n", "  ", {"Steps": 1})
    assert text == "(cat:1.2), dog \n\nNegative prompt:   \nSteps: 1"
    assert format_infotext("a cat", "bad", {}) == "a cat\nNegative prompt: bad"


def test_png_bytes_round_trip_latin1_uses_text_chunk() -> None:
    data = png_bytes(small_image(), EXAMPLE_TEXT)
    assert read_infotext(data) == EXAMPLE_TEXT
    text_chunks = [payload for kind, payload in png_chunks(data) if kind == b"tEXt"]
    assert text_chunks == [b"parameters\0" + EXAMPLE_TEXT.encode("latin-1")]
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (8, 6) and image.mode == "RGB"
        assert image.getpixel((0, 0)) == (10, 200, 30)


def test_png_bytes_round_trip_unicode_uses_itxt() -> None:
    text = format_infotext("1girl, 桜, café, 🌸", "低品質", {"Steps": 20, "Model": "エニシング"})
    data = png_bytes(small_image(), text)
    assert read_infotext(data) == text
    kinds = [kind for kind, _ in png_chunks(data)]
    assert b"iTXt" in kinds and b"tEXt" not in kinds
    # The text chunk comes before the image data, where every reader looks first.
    assert kinds.index(b"iTXt") < kinds.index(b"IDAT")


def test_read_infotext_finds_a_chunk_after_the_image_data() -> None:
    data = png_bytes(small_image(), "placeholder")
    chunks = [(kind, payload) for kind, payload in png_chunks(data) if kind != b"tEXt"]
    text = b"parameters\0late chunk"
    chunks.insert(len(chunks) - 1, (b"tEXt", text))  # just before IEND
    rebuilt = data[:8] + b"".join(
        len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")
        for kind, payload in chunks
    )
    assert read_infotext(rebuilt) == "late chunk"


def test_read_infotext_without_parameters(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    small_image().save(buffer, format="PNG")
    assert read_infotext(buffer.getvalue()) is None
    small_image().save(tmp_path / "plain.jpg", format="JPEG")
    assert read_infotext(tmp_path / "plain.jpg") is None


def test_read_infotext_of_other_text_chunks_only() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "hello")
    buffer = io.BytesIO()
    small_image().save(buffer, format="PNG", pnginfo=info)
    assert read_infotext(buffer.getvalue()) is None


def test_save_png_writes_a_readable_file(tmp_path: Path) -> None:
    target = tmp_path / "00001-114514.png"
    save_png(small_image("RGBA"), target, EXAMPLE_TEXT)
    assert read_infotext(target) == EXAMPLE_TEXT
    assert read_infotext(str(target)) == EXAMPLE_TEXT
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    with Image.open(target) as image:
        assert image.mode == "RGBA"
    # Permissions as for any new file (the temporary file is not left private).
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_save_png_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "image.png"
    save_png(small_image(), target, "first")
    save_png(small_image(), target, "second")
    assert read_infotext(target) == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]


def _disk_full(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_save_png_failure_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    target = tmp_path / "image.png"
    save_png(small_image(), target, "old")
    old_bytes = target.read_bytes()
    monkeypatch.setattr(metadata.os, failing, _disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_png(small_image(), target, "new")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["image.png"]  # no temporary file left behind
    assert target.read_bytes() == old_bytes  # the old image is intact


def test_save_png_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = open

    class HalfWriter:
        """A file that takes the first bytes, then reports a full disk."""

        def __init__(self, handle: io.BufferedWriter) -> None:
            self._handle = handle

        def __enter__(self) -> HalfWriter:
            return self

        def __exit__(self, *exc: object) -> None:
            self._handle.close()

        def write(self, data: bytes) -> int:
            self._handle.write(data[:10])
            self._handle.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        return HalfWriter(real_open(path, mode, *args, **kwargs))  # type: ignore[call-overload]

    monkeypatch.setattr(metadata, "open", fake_open, raising=False)
    target = tmp_path / "new.png"
    with pytest.raises(OSError, match="No space left"):
        save_png(small_image(), target, "text")
    assert list(tmp_path.iterdir()) == []


def test_save_png_bad_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        save_png(small_image(), tmp_path / "missing" / "image.png", "text")


def test_parse_infotext_reads_what_format_infotext_writes():
    """A1111's parse_generation_parameters rules: prompt lines, negative prompt, quoted values
    unquoted, WxH sizes split into -1/-2 keys."""
    from runtime.images.metadata import format_infotext, parse_infotext

    params = {"Steps": 20, "Sampler": "Euler a", "Seed": 5, "Size": "512x768", "Hires prompt": "a, b: c",
              "Hires upscale": 2, "Hires upscaler": "Latent"}  # fmt: skip
    parsed = parse_infotext(format_infotext("1girl,\nsmile", "lowres", params))
    assert parsed["Prompt"] == "1girl,\nsmile" and parsed["Negative prompt"] == "lowres"
    assert parsed["Size-1"] == "512" and parsed["Size-2"] == "768" and "Size" not in parsed
    assert parsed["Hires prompt"] == "a, b: c" and parsed["Hires upscale"] == "2" and parsed["Steps"] == "20"
    assert parse_infotext("just a prompt") == {"Prompt": "just a prompt", "Negative prompt": ""}
