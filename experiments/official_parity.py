"""This library's network against the official VDM code's, at any size (default: the paper's).

Needs a checkout of google-research/vdm (not part of this project; nothing of it is copied here):

  git clone https://github.com/google-research/vdm /tmp/vdm
  python experiments/official_parity.py --official_dir /tmp/vdm [--channels 128 --num_blocks 32]

Builds the official `model_vdm.ScoreUNet`, perturbs every parameter (so zero-initialised layers
matter), evaluates it on random z, gamma and conditioning, ports the parameters with
`vdm_jax.official.convert.from_official` and prints the parameter count and the largest difference
of eps_hat. The measured numbers and the versions they were measured with are in
docs/results/index.md.
"""

import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vdm_jax.official import convert

import common


def import_official(official_dir: str):
  """The official `model_vdm` module, loaded from its file in a checkout (not from sys.path: its
  name is not this project's, and the checkout is not a package)."""
  spec = importlib.util.spec_from_file_location("model_vdm",
                                                os.path.join(official_dir, "model_vdm.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # what `import model_vdm` would hold (dataclasses look it up)
  spec.loader.exec_module(module)
  return module


def main() -> None:
  p = common.parser(__doc__, whole=True)
  p.add_argument("--official_dir", required=True, help="a checkout of google-research/vdm")
  p.add_argument("--channels", type=int, default=128)
  p.add_argument("--num_blocks", type=int, default=32)
  p.add_argument("--attention", action="store_true", help="attention in every block")
  p.add_argument("--batch", type=int, default=2)
  args = p.parse_args()
  model_vdm = import_official(args.official_dir)

  official_config = dict(
      vocab_size=256, sample_softmax=False, antithetic_time_sampling=True,
      with_fourier_features=True, with_attention=args.attention, gamma_type="learnable_scalar",
      gamma_min=-13.3, gamma_max=5.0, sm_n_timesteps=0, sm_n_embd=args.channels,
      sm_n_layer=args.num_blocks, sm_pdrop=0.1)
  net = model_vdm.ScoreUNet(model_vdm.VDMConfig(**official_config))
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((args.batch, 32, 32, 3)), jnp.float32)
  gamma = jnp.asarray(rng.uniform(-13.3, 5.0, args.batch), jnp.float32)
  cond = jnp.asarray(np.arange(args.batch) % 2, jnp.float32)
  params = net.init(jax.random.PRNGKey(0), z, gamma, cond, True)["params"]
  flat = traverse_util.flatten_dict(params)
  params = traverse_util.unflatten_dict(
      {k: v + 0.02 * rng.standard_normal(v.shape).astype(np.float32) for k, v in flat.items()})
  ref = np.asarray(jax.jit(lambda q: net.apply({"params": q}, z, gamma, cond, True))(params))
  config, ported = convert.from_official(params, official_config)
  ours = np.asarray(jax.jit(lambda q: convert.eps_hat(config, q, z, gamma, cond))(ported))
  count = sum(int(v.size) for v in jax.tree.leaves(params))
  print(f"official parameters {count:,}; max |eps_hat ours - official| "
        f"{float(np.abs(ours - ref).max()):.2e}; max |eps_hat - z| {float(np.abs(ref - z).max()):.3f}")


if __name__ == "__main__":
  main()
