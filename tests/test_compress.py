"""Lossless compression (vdm_jax.compression.compress*): exact round trips (the digits test split; K
= 256 with 3 channels), code lengths against the consistency form of the bound, every damaged or
foreign
file named as such, and `vdm-jax compress` / `decompress` end to end."""

import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.compression import compress, compress_app, compress_format as fmt, compress_portable
from vdm_jax.compression import compress_io, compress_stream
from vdm_jax.storage import checkpointing, rundir
from vdm_jax.datasets import data
from vdm_jax.maths import elbo
from vdm_jax.nets import model as model_lib
from vdm_jax.core import parallel
from vdm_jax.training import runs
from vdm_jax.training import state as state_lib, stored_config, tasks

ROOT = pathlib.Path(__file__).resolve().parents[1]
T = 4


def _perturbed(params, seed, scale):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                   for p, k in zip(leaves, keys)])


def _save_run(workdir, config, step, seed):
  """A run directory of `config` whose EMA parameters are random (init + noise): what
  `vdm-jax train` leaves, without training."""
  task = tasks.build_task(config, data.get_info(config.data.name))
  optimizer = state_lib.build_optimizer(config)
  rep = parallel.replicated(parallel.make_mesh())
  fresh = jax.jit(lambda: state_lib.init_state(task, optimizer.tx, seed=config.seed),
                  out_shardings=rep)()
  saved = fresh.replace(ema_params=_perturbed(fresh.params, seed, 0.05),
                        step=jax.device_put(jnp.asarray(step, jnp.int32), rep))
  os.makedirs(workdir, exist_ok=True)
  stored_config.check_workdir_config(config, str(workdir))
  with checkpointing.CheckpointManager(workdir / "checkpoints", async_save=False) as manager:
    manager.save(step, saved, force=True)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  """A smoke-config digits run (random weights, step 3), its Model and the test split."""
  config = __import__("runpy").run_path(str(ROOT / "configs" / "smoke.py"))["get_config"]()
  workdir = tmp_path_factory.mktemp("runs") / "digits"
  _save_run(workdir, config, 3, seed=1)
  run = runs.load_run(str(workdir))
  split = data.get_source("digits", split="test")
  images = np.stack([np.asarray(split[i]["image"]) for i in range(len(split))])
  return {"workdir": workdir, "config": config, "model": compress_app.run_model(run),
          "images": images}


def test_round_trip_of_the_digits_test_split_is_exact(digits):
  blob, stats = compress_app.compress_images(digits["model"], digits["images"],
                                             compress.CoderSettings(T), raw_fallback=False)
  out, header = compress_app.decompress_bytes(digits["model"], blob)
  assert out.dtype == digits["images"].dtype == np.uint8 and out.shape == (297, 8, 8, 1)
  np.testing.assert_array_equal(out, digits["images"])
  assert header.num_images == 297 and stats["schedule"][0] == 1
  assert header.head == stats["head"] >= 1 and header.head + sum(stats["schedule"]) == 297
  assert stats["file_bits"] == 8 * len(blob)


def test_round_trip_with_256_levels_and_3_channels_is_exact():
  vdm = model_lib.build_model(
      vocab_size=256, schedule="learned_linear", gamma_min=-13.3, gamma_max=5.0, channels=8,
      num_blocks=1, fourier_exponents=(6,), attention_everywhere=False, dropout=0.0,
      num_classes=0, block_impl="unrolled", remat=False, dtype=jnp.float32, norm_groups=8)
  images = np.random.default_rng(0).integers(0, 256, (12, 4, 4, 3)).astype(np.uint8)
  params = vdm.init({"params": jax.random.PRNGKey(0), "diffusion": jax.random.PRNGKey(1)},
                    jnp.zeros((1, 4, 4, 3), jnp.int32), train=False)["params"]
  model = compress_app.vdm_model(vdm, _perturbed(params, 2, 0.2), shape=(4, 4, 3),
                                 config={"rgb": 256}, step=0)
  blob, stats = compress_app.compress_images(model, images, compress.CoderSettings(3),
                                             raw_fallback=False)
  out, _ = compress_app.decompress_bytes(model, blob)
  np.testing.assert_array_equal(out, images)
  assert stats["escapes"] > 0   # a random network: p misses by far, escapes are exercised


def test_code_lengths_agree_with_the_consistency_form_of_the_bound(digits):
  """The realised code lengths (without initial bits) against `elbo.consistency_terms`, the
  same T-step bound: equal in expectation. Per image, the coder's ideal code length (densities
  on its own latents) minus the bound (64 samples) has mean 0 within 4 standard errors; the ANS
  stream adds < 0.2% to the ideal code of its models (grid masses, escapes as sent), and the
  grid < 0.1%."""
  model, images, steps = digits["model"], digits["images"], 10
  coder = compress_app.chain(model, compress.CoderSettings(steps))
  encoded = compress_stream.encode_images(coder, images.astype(np.int32), expected_bits=300.0,
                                         raw_fallback=False, head=False)
  bound = jax.jit(lambda key: elbo.consistency_terms(
      key, jnp.asarray(images, jnp.int32), eps_fn=model.eps_fn, gamma_fn=model.gamma_fn,
      vocab_size=model.vocab_size, num_steps=steps).total)
  nats = np.mean([np.asarray(bound(jax.random.PRNGKey(s))) for s in range(64)], axis=0)
  diff = encoded.ideal_continuous - nats / np.log(2.0)
  se = diff.std(ddof=1) / np.sqrt(len(diff))
  assert abs(diff.mean()) < 4 * se, (diff.mean(), se)
  total = encoded.ideal_coder.sum()
  assert abs(encoded.net_bits - total) < 2e-3 * total, (encoded.net_bits, total)
  grid = encoded.ideal_grid.sum()
  assert abs(grid - encoded.ideal_continuous.sum()) < 1e-3 * grid
  assert 0 < encoded.initial_bits < 0.25 * encoded.net_bits


@pytest.fixture(scope="module")
def packed(digits):
  """A float-coded file of 20 images (random weights: stored raw were it allowed)."""
  images = digits["images"][:20]
  blob, _ = compress_app.compress_images(digits["model"], images, compress.CoderSettings(T),
                                         raw_fallback=False)
  return blob


def _expect(kind, match, model, blob):
  with pytest.raises(fmt.CompressedFileError, match=match) as info:
    compress_app.decompress_bytes(model, blob)
  assert info.value.kind == kind


def test_damaged_and_foreign_files_are_named(digits, packed):
  model = digits["model"]
  _expect("format", "not a vdm-jax compressed file", model, b"\x89PNG\r\n" + packed[6:])
  _expect("format", "format version 9", model, packed[:4] + b"\x09" + packed[5:])
  _expect("format", "is empty, not a vdm-jax compressed file", model, b"")
  _expect("truncated", "truncated", model, packed[:-1])
  _expect("truncated", "truncated", model, packed[:40])
  _expect("truncated", "truncated", model, packed[:2])
  header_end = len(packed) - 4 - 4 * fmt.unpack(packed)[0].payload_words
  for offset in (10, 20, header_end + 3, len(packed) - 2):   # header, payload, checksum
    damaged = bytearray(packed)
    damaged[offset] ^= 0x10
    _expect("corrupted", "corrupted", model, bytes(damaged))
  _expect("corrupted", "bytes follow", model, packed + b"\0")


def test_another_model_or_numeric_environment_is_refused(digits, packed, monkeypatch):
  model = digits["model"]
  _expect("model", "parameters differ", model._replace(params_digest=b"x" * 6), packed)
  _expect("model", r"checkpoint step differs \(file: step 3, this run: step 4\)",
          model._replace(step=4), packed)
  _expect("model", "model config differs", model._replace(config_digest=b"ab"), packed)
  monkeypatch.setattr(compress_app, "environment_digest", lambda: b"ot")
  _expect("environment", "another software environment", model, packed)
  monkeypatch.undo()
  monkeypatch.setattr(compress_app, "probe_digest", lambda *a: b"p" * 4)
  _expect("environment", "computes other float bits", model, packed)


def test_a_payload_that_does_not_decode_consistently_is_an_error(digits, packed, monkeypatch):
  """What the fingerprints cannot see is still an error, never images: (a) the network computes
  other bits when decoding (simulated: one output moved by 1e-3), so the coder refuses a symbol;
  (b) a well-formed file whose stack does not end as the seed it started from (its seed
  bookkeeping forged, checksums recomputed)."""
  model = digits["model"]
  coder = compress_app.chain(model, compress.CoderSettings(T))
  header, payload = fmt.unpack(packed)
  forged = fmt.pack(header._replace(seed_dropped=header.seed_dropped - 1), payload)
  _expect("stream", "does not end in the seed it started from", model, forged)
  _expect("corrupted", "impossible coder settings", model,
          fmt.pack(header._replace(window=0), payload))
  step = coder.model.step
  monkeypatch.setattr(compress_app, "probe_digest", lambda *a: header.probe_digest)
  monkeypatch.setattr(coder, "model", coder.model._replace(
      step=lambda z, s, t: (lambda m, x: (m.at[0, 0, 0, 0].add(1e-3), x))(*step(z, s, t))))
  _expect("stream", "does not decode consistently", model, packed)


@pytest.mark.parametrize("images, match", [
    (np.zeros((2, 8, 8, 3), np.uint8), r"shape \[B, \*\(8, 8, 1\)\]"),
    (np.full((2, 8, 8, 1), 17, np.uint8), "value 17 .* outside"),
    (np.zeros((2, 8, 8, 1), np.float32), "expected integer images"),
    (np.zeros((0, 8, 8, 1), np.uint8), "no images"),
])
def test_bad_images_are_refused(digits, images, match):
  with pytest.raises(ValueError, match=match):
    compress_app.compress_images(digits["model"], images, compress.CoderSettings(T))


def test_pngs_hold_the_levels_spread_over_0_255():
  k = np.arange(17, dtype=np.uint8)
  pixels = compress_io.level_pixels(k, 17)
  assert pixels[0] == 0 and pixels[-1] == 255
  np.testing.assert_array_equal(compress_io.png_levels(pixels, 17, name="x"), k)
  with pytest.raises(ValueError, match="pixel value 5 is not one of the 17 levels"):
    compress_io.png_levels(np.array([5], np.uint8), 17, name="x")


def test_a_failed_write_leaves_nothing_at_out(digits, packed, tmp_path, monkeypatch):
  (tmp_path / "f.vdmz").write_bytes(packed)
  np.save(tmp_path / "in.npy", digits["images"][:3])

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  # The last step of each write fails: the rename into place, after every byte was written.
  monkeypatch.setattr(rundir.os, "replace", full_disk)
  with pytest.raises(runs.RunError, match="No space left on device"):
    compress_app.decompress_run(str(digits["workdir"]), str(tmp_path / "f.vdmz"),
                                out=str(tmp_path / "d"))
  with pytest.raises(runs.RunError, match="No space left on device"):
    compress_app.compress_run(str(digits["workdir"]), source=str(tmp_path / "in.npy"),
                              out=str(tmp_path / "g.vdmz"), num_steps=T)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["f.vdmz", "in.npy"]


def _cli(*args, cwd):
  return subprocess.run([sys.executable, "-m", "vdm_jax.cli", *args], capture_output=True,
                        text=True, timeout=600, cwd=cwd)


def _one_error(proc, message):
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_cli_compress_and_decompress_end_to_end(digits, tmp_path):
  workdir = str(digits["workdir"])
  images = digits["images"][:30]
  np.save(tmp_path / "in.npy", images)
  out = tmp_path / "x.vdmz"
  proc = _cli("compress", "--workdir", workdir, "--num_steps", str(T), "--input",
              str(tmp_path / "in.npy"), "--out", str(out), cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "30 images, checkpoint 3, T=4" in proc.stdout and out.exists()
  # What it does, while it does it (stderr): a line per phase, then one per batch.
  assert "compress: 30 images of" in proc.stderr and "the portable coder" in proc.stderr
  assert re.search(r"batch (\d+)/\1 \(100.0%\)", proc.stderr), proc.stderr[-2000:]
  proc = _cli("decompress", "--workdir", workdir, str(out), "--out", str(tmp_path / "d"),
              cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"decompress: .*x\.vdmz: 30 images, (stored raw|the portable coder)",
                   proc.stderr), proc.stderr[-2000:]
  np.testing.assert_array_equal(np.load(tmp_path / "d" / "images.npz")["images"], images)
  assert len(list((tmp_path / "d").glob("*.png"))) == 30
  # The decompressed PNG folder is a valid input: the same images (one tile each), hence the
  # same payload; the header adds their names. The portable coder is found in the run
  # directory this time.
  proc = _cli("compress", "--workdir", workdir, "--num_steps", str(T), "--input",
              str(tmp_path / "d"), "--out", str(tmp_path / "again.vdmz"), cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "made the portable coder" not in proc.stderr + proc.stdout
  assert "30 photographs (30 tiles of 8x8)" in proc.stdout
  again, first = fmt.unpack((tmp_path / "again.vdmz").read_bytes()), fmt.unpack(out.read_bytes())
  np.testing.assert_array_equal(again[1], first[1])
  assert again[0] == first[0]._replace(pictures=tuple(
      fmt.Picture(f"{i:05d}.png", 8, 8) for i in range(30)))
  # Bad input: one error line, exit status 2, nothing at --out.
  np.save(tmp_path / "bad.npy", np.full((3, 8, 8, 1), 99, np.int64))
  proc = _cli("compress", "--workdir", workdir, "--input", str(tmp_path / "bad.npy"), "--out",
              str(tmp_path / "y.vdmz"), cwd=tmp_path)
  _one_error(proc, "value 99 at index (0, 0, 0, 0) is outside [0, 17)")
  assert not (tmp_path / "y.vdmz").exists()
  damaged = bytearray(out.read_bytes())
  damaged[-20] ^= 1
  (tmp_path / "bad.vdmz").write_bytes(bytes(damaged))
  proc = _cli("decompress", "--workdir", workdir, str(tmp_path / "bad.vdmz"), "--out",
              str(tmp_path / "e"), cwd=tmp_path)
  _one_error(proc, "is corrupted: its payload fails its checksum")
  assert not (tmp_path / "e").exists()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".vdmz")] == []


def test_the_portable_coder_is_made_on_first_use_and_found_by_decompress(digits, tmp_path,
                                                                        capsys, monkeypatch):
  """`compress_run` makes the run's integer model on first use (one line says so) and stores it
  in RUN/portable/; the file's header names it and `decompress_run` needs no flag; without the
  stored model it is made again from the checkpoint (the same bits on this machine);
  coder="float" keeps the float coder. (The model's code is forced: these random weights code
  digits at more than log2 17 bits, so the files would otherwise be stored raw.)"""
  monkeypatch.setattr(compress_stream, "raw_bits", lambda n, k: float("inf"))
  monkeypatch.setattr(compress_portable, "smaller", lambda blob, header, images: blob)
  work = tmp_path / "run"
  shutil.copytree(digits["workdir"], work, ignore=shutil.ignore_patterns("portable"))
  images = digits["images"][:5]
  np.save(tmp_path / "in.npy", images)
  run = lambda out, **kw: compress_app.compress_run(str(work), source=str(tmp_path / "in.npy"),
                                                    out=str(tmp_path / out), num_steps=2, **kw)
  run("a.vdmz")
  assert "compress: made the portable coder of checkpoint 3" in capsys.readouterr().err
  run("b.vdmz")
  printed = capsys.readouterr()
  assert "made the portable coder" not in printed.err
  head = fmt.unpack((tmp_path / "b.vdmz").read_bytes())[0].head
  assert f"portable coder, the first {head} image{'s' * (head != 1)} coded directly" in printed.out
  a = (tmp_path / "a.vdmz").read_bytes()
  assert a == (tmp_path / "b.vdmz").read_bytes() and fmt.unpack(a)[0].coder == "portable"
  stored = list((work / "portable").glob("*.vdmq"))
  assert [p.name[:12] for p in stored] == [fmt.unpack(a)[0].params_digest.hex()]
  out = compress_app.decompress_run(str(work), str(tmp_path / "a.vdmz"), out=str(tmp_path / "d"))
  np.testing.assert_array_equal(out["images"], images)
  shutil.rmtree(work / "portable")
  out = compress_app.decompress_run(str(work), str(tmp_path / "a.vdmz"), out=str(tmp_path / "e"))
  np.testing.assert_array_equal(out["images"], images)
  run("f.vdmz", coder="float")
  assert fmt.unpack((tmp_path / "f.vdmz").read_bytes())[0].coder == "float"
