"""`vdm-jax compress` / `vdm-jax decompress`: a trained run's bits-back coder on files::

  compress_run(workdir, source=..., out=FILE)   -> the images of `source` ("test": the run's
                                                  test split; a .npy / .npz of integer images;
                                                  a PNG photograph of any size or a folder of
                                                  them: their tiles) in one file
  decompress_run(workdir, FILE, out=DIR)        -> DIR/<each photograph's name>, or
                                                  DIR/00000.png ... and DIR/images.npz

Two coders (`CODERS`): "portable" (the default: the integer network of `portable`, made from the
run's EMA parameters on first use and stored in RUN/portable/; the file decodes on any machine)
and "float" (`compress.Chain` over the float network: a little tighter, but decodes only where
the network computes the encoder's float bits). The images are one stream (`compress_stream`),
the file `compress_format`; where the model's file would be longer than the images stored raw,
the stored file is written instead (`compress_portable.smaller`). The file's header says which
coder wrote it; `decompress` follows it. Every bad input (a source of the wrong shape,
type or range, a damaged file, a file of another model or numeric environment, an --out that
exists) is a ValueError naming the problem, raised before anything is written; outputs are
written to a temporary name and renamed, so nothing half-written is ever left at --out. The
images are read and written as `compress_io` says (PNGs hold the K levels spread over 0..255).
"""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.compression import compress, compress_format as fmt, compress_io, compress_portable
from vdm_jax.compression import compress_stream
from vdm_jax.core import checks
from vdm_jax.datasets import data
from vdm_jax.maths import elbo
from vdm_jax.nets import model as model_lib
from vdm_jax.storage import metrics, rundir
from vdm_jax.training.runs import Run, RunError, compiled_as_configured, load_run

DEFAULT_STEPS = 1000    # T for a continuous-time model when --num_steps is not given
CODERS = ("portable", "float")


class Model(NamedTuple):
  """A VDM as the compressor sees it: pure closures and the identity stored in file headers."""

  eps_fn: Callable
  gamma_fn: Callable
  shape: tuple[int, int, int]
  vocab_size: int
  config_digest: bytes
  step: int
  params_digest: bytes


def params_digest(*trees: Any) -> bytes:
  """SHA-256 (6 bytes) of every leaf's path, dtype, shape and bytes."""
  parts = []
  for tree in trees:
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
      leaf = np.asarray(leaf)
      parts += [jax.tree_util.keystr(path).encode(), f"{leaf.dtype}{leaf.shape}".encode(),
                leaf.tobytes()]
  return fmt.digest(*parts, size=fmt.DIGEST_SIZES["params"])


def vdm_model(vdm: model_lib.VDM, params: Any, *, shape: tuple[int, ...], config: dict,
              step: int) -> Model:
  """A `Model` of a VDM module and its parameters (a conditional VDM codes with the null label:
  the unconditional model p(x), as its bound is reported)."""
  classes = vdm.score_net.num_classes
  variables = {"params": params}

  def eps_fn(z, g):
    label = jnp.full((z.shape[0],), classes, jnp.int32) if classes else None
    return vdm.apply(variables, z, g, label, method=model_lib.VDM.eps)

  gamma_fn = lambda t: vdm.apply(variables, t, method=model_lib.VDM.gamma)
  config_bytes = json.dumps(config, sort_keys=True, default=str).encode()
  return Model(eps_fn, gamma_fn, tuple(shape), vdm.vocab_size,
               fmt.digest(config_bytes, size=fmt.DIGEST_SIZES["config"]), int(step),
               params_digest(params))


def run_model(run: Run) -> Model:
  """The `Model` of a pixel-space VDM run (its EMA parameters at run.step)."""
  if run.task.name != "vdm":
    raise RunError(f"compression needs a pixel-space VDM run; {run.workdir!r} is a "
                   f"{run.task.name!r} run")
  config = {"task": run.config.task, "data": run.config.data.name,
            "model": run.config.model.to_dict()}
  return vdm_model(run.task.model, run.params, shape=run.info.shape, config=config,
                   step=run.step)


def environment_digest() -> bytes:
  """Digest of what decides the coder's float arithmetic besides the model: jax / jaxlib,
  backend and device kind, constriction, the format version."""
  text = (f"jax={jax.__version__};jaxlib={importlib.metadata.version('jaxlib')};"
          f"backend={jax.default_backend()};device={jax.devices()[0].device_kind};"
          f"constriction={importlib.metadata.version('constriction')};format={fmt.VERSION}")
  return fmt.digest(text.encode(), size=fmt.DIGEST_SIZES["environment"])


_CHAINS: dict = {}


def chain(model: Model, settings: compress.CoderSettings) -> compress.Chain:
  """The compiled `compress.Chain` of a model (cached: compiling is the slow part)."""
  key = (model, settings)
  if key not in _CHAINS:
    _CHAINS[key] = compress.Chain(compress.chain_model(
        model.eps_fn, model.gamma_fn, shape=model.shape, vocab_size=model.vocab_size,
        num_steps=settings.num_steps), settings)
  return _CHAINS[key]


def probe_digest(coder: compress.Chain, buckets: set[int]) -> bytes:
  """Digest of the level table and of the compiled step and decoder outputs, at each batch
  bucket the schedule uses, on a fixed pseudo-random input: two machines that compute other
  float bits here would decode garbage, so they must not try."""
  lv = coder.lv
  parts = [np.stack([lv.q_mean_coef, lv.q_std, lv.p_std, lv.delta]).tobytes(), lv.gamma.tobytes()]
  mid = max(1, coder.settings.num_steps // 2)
  for b in sorted(buckets):
    raw = np.random.PCG64(b).random_raw(b * coder.dims).astype(np.float64)
    z = (raw * 2.0**-63 - 1.0).astype(np.float32).reshape((b,) + coder.model.shape)
    mean, x_hat = coder.model.step(z, lv.gamma[mid - 1], lv.gamma[mid])
    probs = coder.model.probs(z, lv.gamma[0])
    parts += [np.asarray(mean).tobytes(), np.asarray(x_hat).tobytes(), np.asarray(probs).tobytes()]
  return fmt.digest(*parts, size=fmt.DIGEST_SIZES["probe"])


def expected_bits(model: Model, images: np.ndarray, num_steps: int) -> float:
  """A quick estimate of the T-step bound in bits per image (one sample, <= 256 images), which
  sets the batch schedule's growth (`compress_stream`)."""
  x = jnp.asarray(images[:256], jnp.int32)
  terms = jax.jit(lambda key, x: elbo.elbo_terms(
      key, x, eps_fn=model.eps_fn, gamma_fn=model.gamma_fn, vocab_size=model.vocab_size,
      num_steps=num_steps).total)(jax.random.PRNGKey(0), x)
  return float(np.mean(np.asarray(terms))) / np.log(2.0)


def _validated(model: Model, images: np.ndarray) -> np.ndarray:
  images = data.validate_images(images, info=data.DatasetInfo(
      "the input", model.shape, model.vocab_size, 0, {}))
  if images.ndim == 3:
    images = images[None]
  if not len(images):
    raise ValueError("the input holds no images")
  if str(images.dtype) not in fmt.DTYPES:
    raise ValueError(f"the input's integer type {images.dtype} is not one of {fmt.DTYPES}")
  return images


def compress_images(model: Model, images: np.ndarray, settings: compress.CoderSettings, *,
                    coder: compress_portable.Coder | None = None, raw_fallback: bool = True,
                    progress: Callable[[int, int], None] | None = None,
                    pictures: tuple[fmt.Picture, ...] = ()) -> tuple[bytes, dict]:
  """The file's bytes for integer images [N, H, W, C] (validated against the model) and the
  accounting (`compress_stream.Encoded` fields, sizes in bits, "coder"). With `coder` (an
  integer model) the portable coder writes it, else the float one; with `raw_fallback`, batches
  and the whole file are stored raw where that is smaller (False: the model's code always, e.g.
  to test it). `progress(batches done, batches in all)` is called after each batch.
  `pictures`: the photographs whose tiles the images are (`compress_io.Source`), kept in the
  header."""
  images = _validated(model, images)
  settings = compress.check_settings(settings)
  bound = expected_bits(model, images, settings.num_steps)
  if coder is not None:
    return compress_portable.compress_images(coder, images, settings,
                                             config_digest=model.config_digest, step=model.step,
                                             expected_bits=bound, raw_fallback=raw_fallback,
                                             progress=progress, pictures=pictures)
  chain_ = chain(model, settings)
  encoded = compress_stream.encode_images(chain_, images.astype(np.int32), expected_bits=bound,
                                          raw_fallback=raw_fallback, progress=progress)
  header = fmt.Header(
      model.config_digest, model.step, model.params_digest, environment_digest(),
      probe_digest(chain_, compress_stream.buckets(encoded.schedule)), settings.num_steps,
      settings.grid_bits, settings.window, settings.max_batch, model.vocab_size, model.shape,
      str(images.dtype), len(images), encoded.rho, encoded.seed_words, encoded.seed_dropped,
      len(encoded.payload), "float", tuple(pictures), encoded.head)
  blob = fmt.pack(header, encoded.payload)
  if raw_fallback:
    blob = compress_portable.smaller(blob, header, images)
  written = fmt.unpack(blob)[0]
  stats = dict(encoded._asdict(), payload=None, file_bits=8 * len(blob),
               header_bits=8 * (len(blob) - 4 * written.payload_words),
               num_images=len(images), dims=int(images[0].size), coder=written.coder)
  return blob, stats


def decompress_bytes(model: Model | compress_portable.Coder | None, blob: bytes, *,
                     name: str = "the file", on_step: Callable | None = None,
                     progress: Callable[[int, int], None] | None = None
                     ) -> tuple[np.ndarray, fmt.Header]:
  """(images [N, H, W, C] of the stored type, header) of a file's bytes, after every check.
  `model`: the float `Model` for a "float" file, the integer model (`compress_portable.Coder`)
  for a "portable" one, anything (None) for a "stored" one; `on_step` and `progress` as
  `compress_stream.decode_images`.

  Raises:
    vdm_jax.compression.compress_format.CompressedFileError: another format, truncated, corrupted,
      another model or numeric environment, or a payload that does not decode consistently
      ("stream").
  """
  header, payload = fmt.unpack(blob, name=name)
  if header.coder == "stored":
    images = compress_portable.stored_images(header, payload, name=name)
    return images.astype(header.dtype), header
  if header.coder == "portable" or isinstance(model, compress_portable.Coder):
    if header.coder != "portable" or not isinstance(model, compress_portable.Coder):
      needs = "its integer model" if header.coder == "portable" else "the float model"
      raise fmt.CompressedFileError("model", f"{name} was written by the {header.coder} coder; "
                                    f"it decodes with {needs}")
    return compress_portable.decompress_bytes(model, blob, name=name, on_step=on_step,
                                              progress=progress)
  settings = compress_stream.header_settings(header, name=name)
  if header.shape != model.shape or header.vocab_size != model.vocab_size:
    raise fmt.CompressedFileError("model", f"{name} holds images of shape {header.shape} with "
                                  f"{header.vocab_size} levels; this model codes {model.shape} "
                                  f"with {model.vocab_size}")
  coder = chain(model, settings)
  sizes = compress_stream.schedule(header.num_images, rho=header.rho,
                                   max_batch=header.max_batch, head=header.head,
                                   version=header.version)
  mine = header._replace(config_digest=model.config_digest, step=model.step,
                         params_digest=model.params_digest,
                         environment_digest=environment_digest(),
                         probe_digest=probe_digest(coder, compress_stream.buckets(sizes)))
  fmt.check_model(header, mine, name=name)
  images = compress_stream.decode_file(coder, header, payload, name=name,
                                       model="this model here", on_step=on_step,
                                       progress=progress)
  return images.astype(header.dtype), header


def _decoder(workdir: str, header: fmt.Header, path: str, checkpoint: int | None):
  """What decodes the file: nothing (stored), its integer model from RUN/portable/ (made again
  from the checkpoint if missing, accepted only with the same digest), or the float model."""
  load = lambda: load_run(workdir, step=header.step if checkpoint is None else checkpoint)
  if header.coder == "portable":
    def remake():
      run = load()
      metrics.say("decompress", f"its integer model {header.params_digest.hex()} is not in "
                                f"the run directory: quantising checkpoint {run.step} again "
                                f"(used only if it is the same)")
      return compress_portable.make_coder(run, run_model(run))
    return compress_portable.coder_for_file(workdir, header, name=path, remake=remake)
  return None if header.coder == "stored" else run_model(load())


class _BatchBar:
  """`progress(batches done, batches in all)` of the coders as a progress bar on stderr
  (`metrics.ProgressBar`, about 20 lines at most in a log), made at the first report: the
  encoder knows how many batches there are only after the first."""

  def __init__(self):
    self.bar: metrics.ProgressBar | None = None

  def __call__(self, done: int, total: int) -> None:
    if self.bar is None:
      self.bar = metrics.ProgressBar(total=total, enabled=True, unit="batch",
                                     log_every=max(1, total // 20))
    self.bar.update(done)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def _check_new(path: str, what: str) -> str:
  """`path` (normalised) if nothing is there (an empty directory is accepted for a folder) and
  it can be written (`rundir.check_new`); RunError otherwise."""
  try:
    return rundir.check_new(path, folder=what == "folder")
  except FileExistsError as e:
    raise RunError(f"--out {rundir.normalize(path)!r} exists; pass a new {what}") from e
  except OSError as e:
    raise RunError(f"cannot write --out {rundir.normalize(path)!r}: {e.strerror or e}") from e


def _what(read: compress_io.Source, shape: tuple[int, ...]) -> str:
  """"N images", or "P photograph(s) (N tiles of h x w)"."""
  if not read.pictures:
    return f"{len(read.images)} images"
  count = len(read.pictures)
  return (f"{count} photograph{'s' if count > 1 else ''} ({len(read.images)} tiles of "
          f"{shape[0]}x{shape[1]})")


@compiled_as_configured
def compress_run(workdir: str, *, source: str, out: str, checkpoint: int | None = None,
                 num_steps: int | None = None, grid_bits: int = 4, window: int = 6,
                 max_batch: int = 256, coder: str = "portable") -> dict:
  """Compresses `source` with the run's model into the file `out` (see module docstring);
  returns the accounting of `compress_images` plus "path", "bpd" (the whole file) and "net_bpd"
  (the file without the initial bits). `coder`: "portable" (the integer model, made and stored
  in RUN/portable/ on first use) or "float"."""
  checks.check_choice("coder", coder, CODERS)
  out = _check_new(out, "file")
  if num_steps is not None:
    checks.check_number("num_steps", num_steps, integer=True, low=1)
  compress.check_settings(compress.CoderSettings(num_steps or 1, grid_bits, window, max_batch))
  say = lambda message: metrics.say("compress", message)
  run = load_run(workdir, step=checkpoint)
  model = run_model(run)
  read = compress_io.read_source(source, run.info, data_dir=run.config.data.data_dir or None)
  images = read.images
  steps = num_steps or int(run.config.model.num_steps) or DEFAULT_STEPS
  say(f"{_what(read, run.info.shape)} of {source}, checkpoint {run.step}, T={steps}, the "
      f"{coder} coder")
  integer = (None if coder == "float"
             else compress_portable.coder_of_run(workdir, run, model, log=say))
  say("the images' T-step bound (it sets the batch sizes), then the batches; each new batch "
      "size compiles the network")
  bar = _BatchBar()
  blob, stats = compress_images(model, images, compress.CoderSettings(
      steps, grid_bits=grid_bits, window=window, max_batch=max_batch), coder=integer,
      progress=bar, pictures=read.pictures)
  bar.close()
  try:
    rundir.write_bytes(out, blob)   # atomic: nothing half-written at `out`
  except OSError as e:
    raise RunError(f"cannot write {out} ({e.strerror or e}); nothing was written") from e
  dims = read.dims   # the input's own dimensions (a photograph's padding is not counted)
  stats.update(path=out, bpd=stats["file_bits"] / dims, input_dims=dims,
               net_bpd=(stats["file_bits"] - stats["initial_bits"]) / dims,
               pictures=read.pictures)
  head, unit = stats["head"], "tile" if read.pictures else "image"
  how = ("stored raw: the model's code was longer" if stats["coder"] == "stored"
         else f"{stats['coder']} coder, the first {head} {unit}{'s' * (head != 1)} coded "
              f"directly, {stats['net_bpd']:.4f} without the {stats['initial_bits']} initial "
              f"bits")
  print(f"{_what(read, run.info.shape)}, checkpoint {run.step}, T={steps} -> {out}: "
        f"{len(blob)} bytes, {stats['bpd']:.4f} bits/dim ({how})", flush=True)
  return stats


@compiled_as_configured
def decompress_run(workdir: str, path: str, *, out: str, checkpoint: int | None = None) -> dict:
  """Decompresses the file `path` with the run's model into the folder `out`: its photographs
  as PNGs of their names, or one PNG per image and images.npz (key "images", the stored integer
  type) (`compress_io.decompressed_files`). Returns {"images" (the coded images: a
  photograph's tiles), "header", "out"}."""
  out = _check_new(out, "folder")
  try:
    blob = rundir.read_bytes(path)
  except OSError as e:
    raise RunError(f"cannot read {path!r} ({e.strerror or e})") from e
  header, _ = fmt.unpack(blob, name=path)   # before loading the model: fail fast
  metrics.say("decompress", f"{path}: {header.num_images} images, " + (
      "stored raw" if header.coder == "stored" else
      f"the {header.coder} coder, checkpoint {header.step}, T={header.num_steps}"))
  decoder = _decoder(workdir, header, path, checkpoint)
  bar = _BatchBar()
  images, header = decompress_bytes(decoder, blob, name=path, progress=bar)
  bar.close()
  try:
    rundir.write_folder(out, compress_io.decompressed_files(images, header))   # all or nothing
  except OSError as e:
    raise RunError(f"cannot write the images to {out} ({e.strerror or e}); nothing was "
                   f"written") from e
  count = len(header.pictures)
  print(f"{count} photograph{'s' if count > 1 else ''} of {path} -> {out} (PNGs)" if count else
        f"{len(images)} images of {path} -> {out} (PNGs and images.npz)", flush=True)
  return {"images": images, "header": header, "out": out}
