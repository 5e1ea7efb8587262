"""Whole photographs through the compressor: tiles and their padding, exact round trips of
odd-sized PNGs (RGB, 256 levels; grey, 17 levels through `compress_run`), a folder's names and
sizes, the version-4 header's photograph entries, and every bad input refused before anything
is written."""

import io
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vdm_jax.compression import compress, compress_app, compress_format as fmt, compress_io
from vdm_jax.compression import compress_portable, compress_stream, compress_tiles
from vdm_jax.datasets import data
from vdm_jax.nets import model as model_lib

import test_compress
from test_compress import T, _cli, _one_error, digits   # noqa: F401  (the digits run fixture)

RGB8 = data.DatasetInfo("photos", (8, 8, 3), 256, 0, {})   # an RGB 256-level model of 8x8 patches


def _png(path, pixels, **save):
  picture = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
  picture.save(path, format="PNG", **save)
  return path


def _read(path):
  return np.asarray(Image.open(path))


@pytest.mark.parametrize("height,width", [(8, 8), (37, 45), (9, 16), (15, 8)])
def test_tiles_cover_the_photograph_and_the_padding_is_level_0(height, width):
  photo = np.random.default_rng(0).integers(0, 256, (height, width, 3)).astype(np.uint8)
  tiles = compress_tiles.tiles_of(photo, patch=(8, 8))
  rows, cols = -(-height // 8), -(-width // 8)
  assert tiles.shape == (rows * cols, 8, 8, 3) == (compress_tiles.tile_count(
      height, width, patch=(8, 8)), 8, 8, 3)
  np.testing.assert_array_equal(tiles[0], photo[:8, :8])                 # row-major
  np.testing.assert_array_equal(compress_tiles.photo_of(tiles, height=height, width=width), photo)
  last = tiles[-1]   # the bottom-right tile: its padding is 0
  np.testing.assert_array_equal(last[:(height - 1) % 8 + 1, :(width - 1) % 8 + 1],
                                photo[-((height - 1) % 8 + 1):, -((width - 1) % 8 + 1):])
  assert not last[(height - 1) % 8 + 1:].any() and not last[:, (width - 1) % 8 + 1:].any()
  with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
    compress_tiles.tiles_of(photo[:7], patch=(8, 8))


@pytest.fixture(scope="module")
def rgb_model():
  """A random 256-level RGB model of 8x8 patches (the U-Net at its smallest)."""
  vdm = model_lib.build_model(
      vocab_size=256, schedule="learned_linear", gamma_min=-13.3, gamma_max=5.0, channels=8,
      num_blocks=1, fourier_exponents=(6,), attention_everywhere=False, dropout=0.0,
      num_classes=0, block_impl="unrolled", remat=False, dtype=jnp.float32, norm_groups=8)
  params = vdm.init({"params": jax.random.PRNGKey(0), "diffusion": jax.random.PRNGKey(1)},
                    jnp.zeros((1, 8, 8, 3), jnp.int32), train=False)["params"]
  return compress_app.vdm_model(vdm, test_compress._perturbed(params, 2, 0.05), shape=(8, 8, 3),
                                config={"rgb": 256, "patch": 8}, step=0)


def test_odd_sized_rgb_photographs_come_back_pixel_for_pixel_with_their_names(rgb_model,
                                                                             tmp_path):
  """A folder of RGB PNGs of different sizes (37x45, a whole patch, 9x16) -> their tiles, one
  stream (the model's code forced, no batch raw) -> the same PNGs under the same names; files
  that are not PNGs are not read."""
  rng = np.random.default_rng(1)
  smooth = np.cumsum(rng.integers(-3, 4, (37, 45, 3)), axis=1) % 256
  photos = {"b photo.png": smooth.astype(np.uint8),
            "a.png": rng.integers(0, 256, (8, 8, 3)).astype(np.uint8),
            "c.PNG": rng.integers(0, 256, (9, 16, 3)).astype(np.uint8)}
  for name, pixels in photos.items():
    _png(tmp_path / name, pixels)
  (tmp_path / "notes.txt").write_text("not an image")
  source = compress_io.read_source(str(tmp_path), RGB8)
  assert [p.name for p in source.pictures] == ["a.png", "b photo.png", "c.PNG"]   # sorted
  assert [(p.height, p.width) for p in source.pictures] == [(8, 8), (37, 45), (9, 16)]
  assert source.images.shape == (1 + 30 + 4, 8, 8, 3)
  assert source.dims == sum(p.size for p in photos.values())
  blob, stats = compress_app.compress_images(rgb_model, source.images, compress.CoderSettings(2),
                                             raw_fallback=False, pictures=source.pictures)
  assert stats["raw_batches"] == 0 and stats["coder"] == "float"
  images, header = compress_app.decompress_bytes(rgb_model, blob)
  assert header.pictures == source.pictures
  files = compress_io.decompressed_files(images, header)
  assert sorted(files) == sorted(photos)   # no images.npz: the photographs are the output
  for name, pixels in photos.items():
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(files[name]))), pixels)


def test_a_grey_17_level_photograph_round_trips_through_the_run(digits, tmp_path, monkeypatch,
                                                                capsys):
  """The digits run (K = 17, 8x8 grey): a 37x45 PNG on the levels' scale and a folder of two
  through `compress_run` (the portable coder, its code forced) and `decompress_run`."""
  monkeypatch.setattr(compress_stream, "raw_bits", lambda n, k: float("inf"))
  monkeypatch.setattr(compress_portable, "smaller", lambda blob, header, images: blob)
  rng = np.random.default_rng(2)
  levels = np.clip(np.cumsum(rng.integers(-1, 2, (37, 45)), axis=0) + 8, 0, 16)
  pixels = compress_io.level_pixels(levels, 17)
  folder = tmp_path / "in"
  folder.mkdir()
  _png(folder / "wide.png", pixels)
  _png(folder / "small.png", pixels[:8, 3:11])
  workdir = str(digits["workdir"])
  stats = compress_app.compress_run(workdir, source=str(folder / "wide.png"),
                                    out=str(tmp_path / "one.vdmz"), num_steps=T)
  assert stats["num_images"] == 5 * 6 and stats["input_dims"] == 37 * 45
  assert stats["coder"] == "portable"
  printed = capsys.readouterr()
  assert "1 photograph (30 tiles of 8x8)" in printed.err
  head = stats["head"]
  assert f"the first {head} tile{'s' * (head != 1)} coded directly" in printed.out
  out = compress_app.decompress_run(workdir, str(tmp_path / "one.vdmz"), out=str(tmp_path / "d1"))
  assert sorted(p.name for p in (tmp_path / "d1").iterdir()) == ["wide.png"]
  np.testing.assert_array_equal(_read(tmp_path / "d1" / "wide.png"), pixels)
  assert out["header"].pictures == (fmt.Picture("wide.png", 37, 45),)
  compress_app.compress_run(workdir, source=str(folder), out=str(tmp_path / "two.vdmz"),
                            num_steps=T)
  compress_app.decompress_run(workdir, str(tmp_path / "two.vdmz"), out=str(tmp_path / "d2"))
  assert sorted(p.name for p in (tmp_path / "d2").iterdir()) == ["small.png", "wide.png"]
  np.testing.assert_array_equal(_read(tmp_path / "d2" / "wide.png"), pixels)
  np.testing.assert_array_equal(_read(tmp_path / "d2" / "small.png"), pixels[:8, 3:11])


def _header(**changes):
  header = fmt.Header(b"cf", 7, b"p" * 6, b"en", b"prob", 100, 4, 6, 256, 256, (32, 32, 3),
                      "uint8", 150 + 1, 1 << 16, 4096, 4000, 3, "portable",
                      (fmt.Picture("chelsea.png", 300, 451), fmt.Picture("tile.png", 32, 32)))
  return header._replace(**changes)


def test_the_header_stores_each_photograph_s_name_and_size():
  header = _header()
  blob = fmt.pack(header, np.arange(3, dtype=np.uint32))
  back, payload = fmt.unpack(blob)
  assert back == header and list(payload) == [0, 1, 2]
  assert blob[4] == fmt.VERSION == 5
  # Each photograph adds its sizes and its name (and the length of its name).
  plain = fmt.pack(header._replace(pictures=()), np.zeros(3, np.uint32))
  assert len(blob) - len(plain) == (2 + 2 + 1 + len("chelsea.png")) + (1 + 1 + 1 + 8)
  for bad, match in [({"num_images": 150}, "make 151 tiles; the header says 150"),
                     ({"pictures": (fmt.Picture("a/b.png", 32, 32),), "num_images": 1},
                      "cannot be the file name"),
                     ({"pictures": (fmt.Picture("x.png", 32, 32),) * 2, "num_images": 2},
                      "same name")]:
    with pytest.raises(ValueError, match=re.escape(match)):
      fmt.pack(header._replace(**bad), np.arange(3, dtype=np.uint32))


def test_old_versions_and_forged_photograph_entries_are_named():
  blob = fmt.pack(_header(), np.arange(3, dtype=np.uint32))
  with pytest.raises(fmt.CompressedFileError, match=r"format version 3 \(written by vdm-jax "
                     r"before whole photographs\); this vdm-jax reads version 4, 5") as e:
    fmt.unpack(blob[:4] + b"\x03" + blob[5:])
  assert e.value.kind == "format"
  # A name with a folder in it, with a header checksum that matches: refused as corrupted.
  at = blob.index(b"tile.png")
  forged = bytearray(blob[:at] + b"../t.png" + blob[at + 8:])
  with pytest.raises(fmt.CompressedFileError, match="impossible photograph entry") as e:
    fmt.unpack(bytes(forged))
  assert e.value.kind == "corrupted"
  with pytest.raises(fmt.CompressedFileError, match="truncated"):
    fmt.unpack(blob[:at + 3])


def _bad_inputs(folder):
  """{what: (path, the error's words)} for an RGB 256-level model of 8x8 patches."""
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)
  cases = {
      "palette": (_png(folder / "p.png", Image.fromarray(rgb).quantize(16)), "a palette PNG"),
      "16-bit": (folder / "w.png", "a 16-bit greyscale PNG"),
      "rgba": (_png(folder / "a.png", np.dstack([rgb, rgb[..., :1]])), "an alpha channel"),
      "grey+alpha": (_png(folder / "la.png", np.dstack([rgb[..., :1], rgb[..., :1]])),
                     "an alpha channel"),
      "transparent colour": (_png(folder / "t.png", rgb, transparency=(0, 0, 0)),
                             "a transparent colour"),
      "grey for an RGB model": (_png(folder / "g.png", rgb[..., 0]), "a greyscale PNG; the "
                                "model codes RGB images (3 channels)"),
      "smaller than a patch": (_png(folder / "s.png", rgb[:7]), "a 7x10 image is smaller than "
                               "one patch of the model (8x8)"),
      "not a PNG": (folder / "j.png", "not a PNG file"),
      "damaged PNG": (folder / "d.png", "cannot be decoded as a PNG"),
      "missing": (folder / "none.png", "cannot be read"),
      "folder without PNGs": (folder / "empty", "a folder without .png files"),
  }
  Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "w.png")
  assert _read(folder / "w.png").dtype != np.uint8   # Pillow keeps it 16-bit
  Image.fromarray(rgb).save(folder / "j.png", format="JPEG")
  (folder / "d.png").write_bytes(_png(folder / "d.png", rgb).read_bytes()[:60])
  (folder / "empty").mkdir()
  (folder / "empty" / "images.npz").write_bytes(b"")
  return cases


@pytest.mark.parametrize("what", ["palette", "16-bit", "rgba", "grey+alpha",
                                  "transparent colour", "grey for an RGB model",
                                  "smaller than a patch", "not a PNG", "damaged PNG", "missing",
                                  "folder without PNGs"])
def test_bad_photographs_are_refused_naming_the_problem(what, tmp_path):
  path, match = _bad_inputs(tmp_path)[what]
  with pytest.raises(ValueError, match=re.escape(match)):
    compress_io.read_source(str(path), RGB8)
  if what != "folder without PNGs":   # one bad photograph refuses the folder
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.png").write_bytes(pathlib.Path(path).read_bytes()
                                                if pathlib.Path(path).exists() else b"")
    _png(tmp_path / "folder" / "ok.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"folder[/\\]x\.png"):
      compress_io.read_source(str(tmp_path / "folder"), RGB8)


def test_a_grey_png_off_the_17_levels_or_in_rgb_is_refused_for_digits(digits, tmp_path):
  info = data.get_info("digits")
  _png(tmp_path / "off.png", np.full((8, 9), 5, np.uint8))
  with pytest.raises(ValueError, match="pixel value 5 is not one of the 17 levels"):
    compress_io.read_source(str(tmp_path / "off.png"), info)
  _png(tmp_path / "rgb.png", np.zeros((8, 9, 3), np.uint8))
  with pytest.raises(ValueError, match="an RGB PNG; the model codes greyscale images"):
    compress_io.read_source(str(tmp_path / "rgb.png"), info)


@pytest.mark.slow
def test_cli_refuses_bad_photographs_with_one_error_line(digits, tmp_path):
  """`vdm-jax compress` on a palette PNG, an RGB PNG for the grey model and a folder with no
  images: one `error:` line each, exit status 2, nothing written."""
  workdir = str(digits["workdir"])
  grey = compress_io.level_pixels(np.zeros((9, 9), np.int64), 17)
  _png(tmp_path / "p.png", Image.fromarray(grey).convert("P"))
  _png(tmp_path / "rgb.png", np.zeros((9, 9, 3), np.uint8))
  (tmp_path / "empty").mkdir()
  for source, message in [("p.png", "p.png: a palette PNG"),
                          ("rgb.png", "rgb.png: an RGB PNG; the model codes greyscale"),
                          ("empty", "is a folder without .png files")]:
    proc = _cli("compress", "--workdir", workdir, "--num_steps", str(T), "--input",
                str(tmp_path / source), "--out", str(tmp_path / "x.vdmz"), cwd=tmp_path)
    _one_error(proc, message)
    assert not (tmp_path / "x.vdmz").exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "p.png", "rgb.png"]
