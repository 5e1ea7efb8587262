"""Files of the portable coder and of stored (raw) images, for `compress_app`.

- `compress_images` / `decompress_bytes`: a "portable" file (decodes on any machine), and its
  images after every check;
- `stored_blob` / `stored_images`: a "stored" file, the images at log2 K bits each, written
  instead where the model's file is longer;
- `coder_of_run`: the run's integer model, found in RUN/portable/ or made and stored there;
  `coder_for_file`: the integer model a file names.

A file's size is therefore at most the raw size (ceil(N D log2 K / 32) words plus the 64-bit
coder head) plus the header.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import numpy as np

from vdm_jax.compression import compress, compress_format as fmt, compress_stream, portable
from vdm_jax.compression import portable_quant, portable_store
from vdm_jax.datasets import data
from vdm_jax.storage import metrics, rundir
from vdm_jax.training.runs import Run, RunError

CALIBRATION_IMAGES = 256   # training images the integer model is calibrated on
CALIBRATION_LEVELS = 8     # noise levels per image


@dataclasses.dataclass(frozen=True, eq=False)
class Coder:
  """An integer model and its SHA-256 (hex): what a portable file names (equal and hashed by
  the digest)."""

  model: portable.IntModel
  digest: str

  def __hash__(self):
    return hash(self.digest)

  def __eq__(self, other):
    return isinstance(other, Coder) and self.digest == other.digest

  @property
  def header_digest(self) -> bytes:
    return bytes.fromhex(self.digest)[:fmt.DIGEST_SIZES["params"]]


def from_bytes(blob: bytes, *, name: str = "the integer model") -> Coder:
  return Coder(portable.from_bytes(blob, name=name), portable.model_digest(blob))


@functools.lru_cache(maxsize=8)
def chain(coder: Coder, settings: compress.CoderSettings) -> portable.PortableChain:
  return portable.PortableChain(coder.model, settings)


def probe_digest(ch: portable.PortableChain, buckets: set[int]) -> bytes:
  """Digest of the level table, the integer network's outputs and the decoder's integer
  probabilities on a fixed input, per batch bucket: the same on every machine unless a
  backend computes integers wrongly, which decoding would then refuse rather than misread."""
  lv = ch.lv
  parts = [np.stack([lv.q_mean_coef, lv.q_std, lv.p_std, lv.delta, ch.tab.mean_a,
                     ch.tab.mean_b]).astype("<f8").tobytes()]
  mid = max(1, ch.settings.num_steps // 2)
  for b in sorted(buckets):
    raw = np.random.PCG64(b).random_raw(b * ch.dims)
    j = (raw % (1 << 14)).astype(np.int64) - (1 << 13)
    parts += [ch.eps(ch.z_input(j, mid, b), mid).astype("<i4").tobytes(),
              ch.probs(j[:ch.dims], 1).astype("<f8").tobytes()]
  return fmt.digest(*parts, size=fmt.DIGEST_SIZES["probe"])


def compress_images(coder: Coder, images: np.ndarray, settings: compress.CoderSettings, *,
                    config_digest: bytes, step: int, expected_bits: float | None = None,
                    raw_fallback: bool = True, progress: Callable[[int, int], None] | None = None,
                    pictures: tuple[fmt.Picture, ...] = ()) -> tuple[bytes, dict]:
  """A portable file of integer images [N, H, W, C] (validated by the caller), or (with
  `raw_fallback`) a stored one where that is smaller; the accounting, `progress` and
  `pictures` as `compress_app.compress_images`."""
  ch = chain(coder, compress.check_settings(settings))
  encoded = compress_stream.encode_images(ch, images.astype(np.int32),
                                          expected_bits=expected_bits, raw_fallback=raw_fallback,
                                          progress=progress)
  buckets = compress_stream.buckets(encoded.schedule)
  header = fmt.Header(
      config_digest, step, coder.header_digest, portable.environment_digest(),
      probe_digest(ch, buckets), settings.num_steps, settings.grid_bits, settings.window,
      settings.max_batch, ch.model.vocab_size, ch.model.shape, str(images.dtype), len(images),
      encoded.rho, encoded.seed_words, encoded.seed_dropped, len(encoded.payload), "portable",
      tuple(pictures), encoded.head)
  blob = fmt.pack(header, encoded.payload)
  if raw_fallback:
    blob = smaller(blob, header, images)
  stats = dict(encoded._asdict(), payload=None, file_bits=8 * len(blob),
               header_bits=8 * (len(blob) - 4 * fmt.unpack(blob)[0].payload_words),
               num_images=len(images), dims=int(images[0].size),
               coder=fmt.unpack(blob)[0].coder)
  return blob, stats


def decompress_bytes(coder: Coder, blob: bytes, *, name: str = "the file",
                     on_step: Callable | None = None,
                     progress: Callable[[int, int], None] | None = None
                     ) -> tuple[np.ndarray, fmt.Header]:
  """(images [N, H, W, C] of the stored type, header) of a portable file, after every check;
  `on_step` and `progress` as `compress_stream.decode_images`."""
  header, payload = fmt.unpack(blob, name=name)
  settings = compress_stream.header_settings(header, name=name)
  if header.params_digest != coder.header_digest:
    raise fmt.CompressedFileError("model", f"{name} was compressed with the integer model "
                                  f"{header.params_digest.hex()}; this is {coder.digest[:12]}")
  spec = coder.model.spec
  if header.shape != tuple(spec["shape"]) or header.vocab_size != spec["vocab_size"]:
    raise fmt.CompressedFileError("corrupted", f"{name} holds images of shape {header.shape} "
                                  f"with {header.vocab_size} levels; its integer model codes "
                                  f"{tuple(spec['shape'])} with {spec['vocab_size']}")
  if header.environment_digest != portable.environment_digest():
    raise fmt.CompressedFileError("environment", f"{name} was compressed by the portable coder "
                                  f"with another constriction version or integer-model format "
                                  f"(their float64 Gaussian code must match); decompress with "
                                  f"the versions it was made with")
  ch = chain(coder, settings)
  sizes = compress_stream.schedule(header.num_images, rho=header.rho,
                                   max_batch=header.max_batch, head=header.head,
                                   version=header.version)
  if probe_digest(ch, compress_stream.buckets(sizes)) != header.probe_digest:
    raise fmt.CompressedFileError("environment", f"{name}: this machine's integer network "
                                  f"computes other outputs than the one that wrote it (integer "
                                  f"arithmetic should be exact everywhere: a backend defect)")
  images = compress_stream.decode_file(ch, header, payload, name=name,
                                       model="its integer model", on_step=on_step,
                                       progress=progress)
  return images.astype(header.dtype), header


# ----------------------------------------------------------------------------------------------
# Stored (raw) files.


def stored_blob(header: fmt.Header, images: np.ndarray) -> bytes:
  """The "stored" file of integer images: the header's identity fields, the images pushed with
  `Uniform(K)` on an empty ANS stack (log2 K bits per value, plus its 64-bit head)."""
  stack = compress.Stack(np.zeros(0, np.uint32))
  compress_stream.push_raw(stack, images, header.vocab_size)
  words = stack.coder.get_compressed()
  return fmt.pack(header._replace(coder="stored", rho=0, seed_words=0, seed_dropped=0,
                                  payload_words=len(words), head=0, environment_digest=b"\0\0",
                                  probe_digest=b"\0" * 4), words)


def stored_images(header: fmt.Header, payload: np.ndarray, *, name: str) -> np.ndarray:
  """The images of a stored file's payload (int32 [N, H, W, C])."""
  count = header.num_images * int(np.prod(header.shape))
  try:
    stack = compress.Stack(payload)
    values = compress_stream.pop_raw(stack, count, header.vocab_size)
  except (ValueError, KeyError, OverflowError) as e:
    raise fmt.CompressedFileError("stream", f"{name}: its stored images do not decode ({e})")
  if not stack.coder.is_empty():
    raise fmt.CompressedFileError("stream", f"{name}: {stack.bits()} bits are left after its "
                                  f"stored images")
  return values.reshape((header.num_images,) + tuple(header.shape))


def smaller(blob: bytes, header: fmt.Header, images: np.ndarray) -> bytes:
  """`blob`, or the stored file of the same images where that is smaller."""
  stored = stored_blob(header, images)
  return stored if len(stored) < len(blob) else blob


# ----------------------------------------------------------------------------------------------
# The integer model of a run: found in the run directory, or made there.


def _meta(run: Run, model: Any) -> dict:
  return {"step": int(run.step), "params_digest": model.params_digest.hex(),
          "config_digest": model.config_digest.hex(),
          "spec_version": portable_quant.SPEC_VERSION,
          "calibration_images": CALIBRATION_IMAGES, "calibration_levels": CALIBRATION_LEVELS}


def make_coder(run: Run, model: Any) -> Coder:
  """Quantises the run's EMA parameters (`portable.make`), calibrated on the first
  CALIBRATION_IMAGES images of its training split; `model` (`compress_app.Model`) gives the
  float model's digests recorded with it."""
  info = run.info
  split = data.get_source(info.name, split="train", data_dir=run.config.data.data_dir or None)
  count = min(CALIBRATION_IMAGES, len(split))
  images = np.stack([np.asarray(split[i]["image"]) for i in range(count)])
  made = portable.make(run.task.model, run.params, images, shape=tuple(info.shape),
                       meta=_meta(run, model), levels=CALIBRATION_LEVELS)
  return from_bytes(portable.to_bytes(made))


def coder_of_run(workdir: str, run: Run, model: Any, *,
                 log: Callable[[str], None] = functools.partial(metrics.say, "compress")
                 ) -> Coder:
  """The integer model of the run's checkpoint: the stored one made from these parameters
  (`model`, the float `compress_app.Model`) with these settings, else a new one, made and
  stored (saying so through `log`, before and after)."""
  want = _meta(run, model)
  for blob in portable_store.list_models(workdir):
    try:
      coder = from_bytes(blob)
    except ValueError:
      continue
    if {k: coder.model.meta.get(k) for k in want} == want:
      return coder
  log(f"no integer model of checkpoint {run.step} in the run directory: quantising it "
      f"(calibrated on {CALIBRATION_IMAGES} training images; once per checkpoint)")
  coder = make_coder(run, model)
  try:
    path = portable_store.write_model(workdir, coder.digest, portable.to_bytes(coder.model))
  except OSError as e:
    raise RunError(f"cannot store the portable coder in {workdir!r} ({e.strerror or e}): a "
                   f"file it writes would not decode elsewhere without it; nothing was "
                   f"written") from e
  log(f"made the portable coder of checkpoint {run.step}: {path} "
      f"({len(portable.to_bytes(coder.model))} bytes); a file it writes decodes where this "
      f"file is")
  return coder


def coder_for_file(workdir: str, header: fmt.Header, *, name: str,
                   remake: Callable[[], Coder] | None = None) -> Coder:
  """The integer model a portable file names, from the run directory. Where it is missing,
  `remake()` (quantising the run's checkpoint again) is tried: the same bits only where the float
  network computed the same calibration bits, so a differing digest is an error that says
  which file to copy."""
  digest = header.params_digest.hex()
  blob = portable_store.read_model(workdir, digest)
  if blob is not None:
    coder = from_bytes(blob, name=portable_store.model_path(workdir, digest))
    if coder.header_digest == header.params_digest:
      return coder
  where = portable_store.model_path(workdir, digest)
  if remake is not None:
    try:
      coder = remake()
    except RunError:
      coder = None
    if coder is not None and coder.header_digest == header.params_digest:
      with contextlib.suppress(OSError):   # kept for next time where the run is writable
        portable_store.write_model(workdir, coder.digest, portable.to_bytes(coder.model))
      return coder
  raise fmt.CompressedFileError("missing", f"{name} was compressed with the integer model "
                                f"{digest}, which is not in this run directory: copy "
                                f"{rundir.name(where)} from the compressing run's "
                                f"{portable_store.SUBDIR}/ folder to {where}")
