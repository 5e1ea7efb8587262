"""The portable coder: bits-back coding whose probabilities are the same bits on every machine.

`compress.Chain` codes with the float network: a file decodes only where the network computes
the encoder's exact float bits (same CPU kind, jaxlib, XLA options, backend). `PortableChain` is
the same chain (Bit-Swap order, grids, windows, escapes, scrambling) with everything its coding
distributions depend on made exactly reproducible:

  - the network: the integer ScoreUNet of `portable_net`, quantised from the float run by
    `make` (post-training quantisation, calibrated on training images: `portable_quant`);
    integer arithmetic has one result on every backend, in any evaluation order;
  - the schedule: gamma at the T + 1 levels interpolated in the integer model's table, and every
    level's constants in exact decimal arithmetic (`portable_levels`);
  - what is handed to the entropy coder: Gaussian means and standard deviations are float64
    results of IEEE operations that are correctly rounded everywhere (`+ - * /`, floor) on those
    exact inputs; the discrete decoder p(k | z_0) is an integer probability table (exp from a
    stored table), handed to constriction's `Categorical` as integers summing to 2^24 - K, which
    it uses as they are (its scale factor is then exactly 1).

constriction's `QuantizedGaussian` computes its cumulative distribution in float64 in its own
compiled code: the 0.5.0 x86-64 wheel imports no libm function (its erf / exp are compiled in),
contains no CPUID dispatch and no FMA / AVX instruction, so one wheel computes the same bits on
every x86-64 CPU; another constriction version may not, so the file's header records it
(`environment_digest`) and decoding with another version is refused.

An integer model is a file (`to_bytes` / `from_bytes`, a JSON index and little-endian arrays,
named by its SHA-256) stored in the run directory by `portable_store`; the file header names it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import struct
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from vdm_jax.compression import compress, portable_levels, portable_net as pn, portable_quant
from vdm_jax.compression import portable_unet as pu

MAGIC = b"VDMQ"
VERSION = 1
_HOST_ONLY = ("cond", "freq", "gamma", "cond_proj", "exp24")


class IntModel(NamedTuple):
  """An integer model: spec (architecture and units, JSON), arrays (nested dict of integer
  arrays: `portable_net`'s q) and meta (where it came from: run step, parameter digest, the
  quantisation settings)."""

  spec: dict
  arrays: dict
  meta: dict


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for key in sorted(tree):
    value = tree[key]
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = np.asarray(value)
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def to_bytes(model: IntModel) -> bytes:
  """A canonical byte string: MAGIC, version, the JSON index (spec, meta, each array's name,
  dtype and shape; sorted keys) as a 4-byte length and UTF-8, then the arrays' little-endian
  bytes in index order. Equal models give equal bytes (hence equal digests)."""
  flat = _flatten(model.arrays)
  index = [[name, a.dtype.newbyteorder("<").str, list(a.shape)] for name, a in flat.items()]
  head = json.dumps({"spec": model.spec, "meta": model.meta, "arrays": index},
                    sort_keys=True, separators=(",", ":")).encode()
  body = b"".join(np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes()
                  for a in flat.values())
  return MAGIC + bytes([VERSION]) + struct.pack("<I", len(head)) + head + body


def from_bytes(data: bytes, *, name: str = "the integer model") -> IntModel:
  """The inverse of `to_bytes` (ValueError naming `name` if it is not one)."""
  if data[:4] != MAGIC or len(data) < 9:
    raise ValueError(f"{name} is not a vdm-jax integer model (no {MAGIC!r} signature)")
  if data[4] != VERSION:
    raise ValueError(f"{name} is an integer model of version {data[4]}; this vdm-jax reads "
                     f"version {VERSION}")
  (size,) = struct.unpack("<I", data[5:9])
  try:
    head = json.loads(data[9:9 + size])
    flat, at = {}, 9 + size
    for key, dtype, shape in head["arrays"]:
      dt = np.dtype(dtype)
      n = dt.itemsize * int(np.prod(shape, dtype=np.int64))
      if at + n > len(data):
        raise ValueError("truncated")
      flat[key] = np.frombuffer(data, dt, int(np.prod(shape, dtype=np.int64)), at).reshape(
          shape).astype(dt.newbyteorder("="))
      at += n
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{name} is damaged ({e})") from None
  if at != len(data):
    raise ValueError(f"{name} is damaged ({len(data) - at} bytes past its arrays)")
  return IntModel(head["spec"], _unflatten(flat), head["meta"])


def model_digest(data: bytes) -> str:
  """The SHA-256 (hex) of an integer model's bytes: its name."""
  return hashlib.sha256(data).hexdigest()


def environment_digest() -> bytes:
  """What the portable coder's bits depend on besides the integer model: this module's format
  and constriction's version (its Gaussian's float64 code). Not jax / jaxlib / the backend."""
  text = (f"portable={VERSION};spec={portable_quant.SPEC_VERSION};"
          f"constriction={importlib.metadata.version('constriction')}")
  return hashlib.sha256(text.encode()).digest()[:2]


def make(vdm: Any, params: Any, images: np.ndarray, *, shape: tuple[int, int, int],
         meta: dict, levels: int = 8, seed: int = 0) -> IntModel:
  """The integer model of a float VDM: calibration on integer training `images` [N, H, W, C]
  at `levels` noise levels each, then quantisation (`portable_quant`)."""
  ranges = portable_quant.calibrate(vdm, params, images, levels=levels, seed=seed)
  spec, arrays = portable_quant.quantize(vdm, params, ranges, shape=shape)
  meta = dict(meta, calibration={"images": int(len(images)), "levels": levels, "seed": seed})
  return IntModel(spec, arrays, meta)


def device_arrays(arrays: dict) -> dict:
  """The part of the integer model the network's forward pass uses, on the device."""
  def keep(tree):
    return {k: keep(v) if isinstance(v, dict) else jnp.asarray(v)
            for k, v in tree.items() if k not in _HOST_ONLY}
  return keep(arrays)


class _Shape(NamedTuple):
  shape: tuple[int, ...]
  vocab_size: int


class PortableChain(compress.Chain):
  """`compress.Chain` with the integer model: same encode / decode, reproducible numbers."""

  def __init__(self, model: IntModel, settings: compress.CoderSettings):
    spec, arrays = model.spec, model.arrays
    self.settings = compress.check_settings(settings)
    self.spec, self.arrays = spec, arrays
    self.model = _Shape(tuple(spec["shape"]), int(spec["vocab_size"]))
    self.dims = int(np.prod(self.model.shape))
    gam = portable_levels.gammas(arrays["gamma"], settings.num_steps)
    self.tab = portable_levels.level_table(gam, gamma_frac=spec["gamma_frac"])
    self.lv = compress.grid_levels(np.asarray(gam, np.float64) / 2.0**spec["gamma_frac"],
                                   self.tab.coef, self.tab.q_std, self.tab.p_std, self.settings,
                                   where="")
    self.cond = pu.cond_biases(arrays, spec, np.asarray(gam, dtype=object)).astype(np.int32)
    self.device = device_arrays(arrays)
    k = self.model.vocab_size
    self.bin_centres = (2.0 * np.arange(k) + 1.0 - k) / k     # 2 (k + 1/2) / K - 1, exactly
    self._words: dict = {}

  def z_input(self, j: np.ndarray, i: int, b: int) -> np.ndarray:
    """The network's input z_i = j delta_i in units of 2^-Z_FRAC (int32), padded to the
    batch's power-of-two bucket with zero rows."""
    m = -int(np.frexp(self.lv.delta[i])[1] - 1)          # delta_i = 2^-m
    j = np.asarray(j, np.int64)
    s = m - pn.Z_FRAC
    z = (j << -s) if s <= 0 else (j + (1 << (s - 1))) >> s
    out = np.zeros((compress.bucket(b) * self.dims,), np.int32)
    out[:z.size] = z
    return out.reshape((-1,) + self.model.shape)

  def eps(self, z: np.ndarray, i: int) -> np.ndarray:
    """eps_hat (int, units 2^-EPS_FRAC) of the integer network at level i."""
    return np.asarray(pu.unet(pn.JAX, self.device, self.spec, z, self.cond[i]), np.int64)

  def network(self, j: np.ndarray, i: int, b: int):
    """p(z_{i-1} | z_i)'s mean A_i z_i + B_i eps_hat [b * D] (float64 from exact inputs) and
    x_hat = (z_i - sigma_i eps_hat) / alpha_i [b, H, W, C] (shown while decoding only)."""
    e = self.eps(self.z_input(j, i, b), i)[:b].reshape(-1) * 2.0**-pn.EPS_FRAC
    z = np.asarray(j, np.float64) * self.lv.delta[i]
    mean = self.tab.mean_a[i] * z + self.tab.mean_b[i] * e
    x_hat = (z - self.tab.sigma[i] * e) / self.tab.alpha[i]
    return mean, x_hat.reshape((b,) + self.model.shape)

  def _padded(self, j: np.ndarray, i: int, b: int) -> np.ndarray:
    return (np.asarray(j, np.float64) * self.lv.delta[i]).astype(np.float32).reshape(
        (b,) + self.model.shape)

  def probs(self, j: np.ndarray, b: int) -> np.ndarray:
    """p(k | z_0) [b * D, K] as integer weights (float64) summing to 2^24 - K: proportional
    to exp(-(z_0 - alpha_0 x_k)^2 / (2 sigma_0^2)), exp from the stored 24-bit table at steps of
    2^-8 nats (`elbo.decoder_logits`), the rounding remainder on the likeliest value."""
    k = self.model.vocab_size
    z0 = np.asarray(j, np.float64) * self.lv.delta[0]
    d = z0[:, None] - self.tab.alpha[0] * self.bin_centres[None, :]
    logit = d * d * (0.5 / (self.tab.sigma[0] * self.tab.sigma[0]))
    table = np.asarray(self.arrays["luts"]["exp24"], np.int64)
    idx = np.minimum(np.floor((logit - logit.min(axis=1, keepdims=True)) * 2.0**pn.LOGIT_FRAC),
                     len(table) - 1).astype(np.int64)
    e = table[idx]
    total = (1 << compress.PRECISION_BITS) - k
    w = e * total // e.sum(axis=1, keepdims=True)
    top = np.argmax(e, axis=1)
    w[np.arange(len(w)), top] += total - w.sum(axis=1)
    return w.astype(np.float64)

  def _scramble(self, stack: compress.Stack, batch_id: int, level: int, b: int) -> None:
    key = (level, b)
    if key not in self._words:
      g = self.lv.q(level)
      self._words[key] = portable_levels.scramble_words(g.std, g.delta, b * self.dims)
    stack.scramble([compress.SCRAMBLE_KEY, batch_id, level], self._words[key])
