"""Tests for vdm_jax.official.official_checkpoint: reading clu checkpoints of the official VDM
trainer.

Most tests write the files exactly as clu 0.0.12 does (`ckpt-N.flax` = flax.serialization.to_bytes
of the train state, and TensorFlow's `checkpoint` state file), without TensorFlow; one test lets
clu itself write them and runs only where TensorFlow and clu are installed.
"""

import os
import sys

import flax
from flax import serialization, traverse_util
import jax
import numpy as np
import optax
import pytest

from vdm_jax.official.official_checkpoint import read_official_checkpoint

# Parameter leaves of the official model (4 blocks x 32 channels, learned linear schedule), saved
# by the official code (tests/data/official_parity); a small tree with the same names stands in
# without it.
_PARITY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "official_parity",
                       "vdm_loss_4x32_learned_linear.npz")


@flax.struct.dataclass
class _OfficialTrainState:
  """The pytree fields of the official TrainState (google-research/vdm train_state.py)."""
  step: jax.Array
  params: flax.core.FrozenDict
  ema_params: flax.core.FrozenDict
  opt_state: optax.OptState
  tx_fn: optax.GradientTransformation = flax.struct.field(pytree_node=False)


def _model_tree() -> dict:
  """The official model's parameter tree {"gamma": ..., "score_model": ...} [leaves float32]."""
  if os.path.exists(_PARITY):
    with np.load(_PARITY) as data:
      flat = {tuple(key.split("/")[1:]): data[key] for key in data.files
              if key.startswith("param/")}
  else:
    rng = np.random.default_rng(0)
    shapes = {("gamma", "w"): (1,), ("gamma", "b"): (1,),
              ("score_model", "conv_in", "kernel"): (3, 3, 15, 32),
              ("score_model", "down.block_0", "conv1", "kernel"): (3, 3, 32, 32),
              ("score_model", "mid.attn_1", "q", "bias"): (32,)}
    flat = {key: rng.normal(size=shape).astype(np.float32) for key, shape in shapes.items()}
  tree = traverse_util.unflatten_dict(flat)
  assert set(tree) == {"score_model", "gamma"}
  return tree


def _official_state(step: int = 1234, shift: float = 0.0) -> _OfficialTrainState:
  """A state shaped like the official one: {"params": ...} wrappers, ema = params + 1."""
  params = flax.core.freeze({"params": jax.tree.map(lambda x: x + shift, _model_tree())})
  tx = optax.adamw(1e-3)
  return _OfficialTrainState(
      step=np.asarray(step, np.int32), params=params,
      ema_params=jax.tree.map(lambda x: x + 1, params), opt_state=tx.init(params), tx_fn=tx)


def _write_clu_save(directory, number: int, state, *, commit: bool = True,
                    kept: tuple[int, ...] = ()) -> str:
  """Writes save `number` of a clu Checkpoint directory, as clu 0.0.12 and TensorFlow do.

  `commit=False` stops after the .flax file (a save interrupted before TensorFlow's part).
  Returns the checkpoint prefix.
  """
  os.makedirs(directory, exist_ok=True)
  prefix = os.path.join(directory, f"ckpt-{number}")
  with open(prefix + ".flax", "wb") as f:
    f.write(serialization.to_bytes(state))
  if commit:
    for suffix in (".index", ".data-00000-of-00001"):
      with open(prefix + suffix, "wb") as f:
        f.write(b"tensorflow objects only (save_counter), no parameters")
    lines = [f'model_checkpoint_path: "ckpt-{number}"']
    lines += [f'all_model_checkpoint_paths: "ckpt-{n}"' for n in (*kept, number)]
    lines += ["all_model_checkpoint_timestamps: 1796023296.0", "last_preserved_timestamp: 1.0"]
    with open(os.path.join(directory, "checkpoint"), "w") as f:
      f.write("\n".join(lines) + "\n")
  return prefix


def _assert_trees_equal(actual: dict, expected) -> None:
  """Same keys, and every leaf a numpy array equal in value, dtype and shape."""
  actual_flat = traverse_util.flatten_dict(actual)
  expected_flat = traverse_util.flatten_dict(flax.core.unfreeze(expected))
  assert set(actual_flat) == set(expected_flat)
  for key, value in expected_flat.items():
    assert isinstance(actual_flat[key], np.ndarray), key
    assert actual_flat[key].dtype == np.asarray(value).dtype, key
    np.testing.assert_array_equal(actual_flat[key], np.asarray(value), err_msg=str(key))


def _assert_reads(result: dict, state: _OfficialTrainState) -> None:
  assert set(result) == {"params", "ema_params", "step"}
  assert isinstance(result["step"], int) and result["step"] == int(state.step)
  _assert_trees_equal(result["params"], state.params["params"])
  _assert_trees_equal(result["ema_params"], state.ema_params["params"])


def test_reads_newest_save_of_a_per_host_directory(tmp_path):
  host0 = tmp_path / "checkpoints-0"
  _write_clu_save(host0, 1, _official_state(step=1000, shift=0.5))
  _write_clu_save(host0, 2, _official_state(), kept=(1,))
  result = read_official_checkpoint(str(host0))
  _assert_reads(result, _official_state())
  assert set(result["params"]) == {"score_model", "gamma"}
  assert not np.array_equal(result["params"]["gamma"]["w"], result["ema_params"]["gamma"]["w"])
  result["params"]["gamma"]["w"][...] = 0.0  # Writeable copies, not views of the file's bytes.
  _assert_reads(read_official_checkpoint(host0), _official_state())  # os.PathLike works too.
  _assert_reads(read_official_checkpoint(str(host0) + "/"), _official_state())


def test_reads_prefix_flax_file_and_tensorflow_sidecar_files(tmp_path):
  host0 = tmp_path / "checkpoints-0"
  old = _official_state(step=1000, shift=0.5)
  prefix = _write_clu_save(host0, 1, old)
  _write_clu_save(host0, 2, _official_state(), kept=(1,))
  _assert_reads(read_official_checkpoint(prefix), old)
  _assert_reads(read_official_checkpoint(prefix + ".flax"), old)
  _assert_reads(read_official_checkpoint(prefix + ".index"), old)
  _assert_reads(read_official_checkpoint(prefix + ".data-00000-of-00001"), old)


def test_multihost_base_takes_the_newest_save_common_to_all_hosts(tmp_path):
  base = tmp_path / "checkpoints"  # As given to MultihostCheckpoint; it never exists itself.
  old, new = _official_state(step=1000, shift=0.5), _official_state()
  for host in (0, 1):
    _write_clu_save(tmp_path / f"checkpoints-{host}", 1, old)
  _write_clu_save(tmp_path / "checkpoints-0", 2, new, kept=(1,))
  _assert_reads(read_official_checkpoint(str(base)), old)  # Host 1 has no save 2 yet.
  _write_clu_save(tmp_path / "checkpoints-1", 2, new, kept=(1,))
  _assert_reads(read_official_checkpoint(str(base)), new)
  os.makedirs(base)  # Created empty by someone: still the per-host directories.
  _assert_reads(read_official_checkpoint(str(base)), new)


def test_the_state_file_decides_which_save_is_newest(tmp_path):
  host0 = tmp_path / "checkpoints-0"
  old = _official_state(step=1000, shift=0.5)
  _write_clu_save(host0, 1, old)
  # Save 2 was interrupted after its .flax file, before TensorFlow committed it.
  _write_clu_save(host0, 2, _official_state(), commit=False)
  _assert_reads(read_official_checkpoint(str(host0)), old)
  _assert_reads(read_official_checkpoint(str(tmp_path / "checkpoints")), old)


def test_moved_directory_with_absolute_paths_and_directory_without_state_file(tmp_path):
  host0 = tmp_path / "copy"
  _write_clu_save(host0, 3, _official_state())
  (host0 / "checkpoint").write_text(  # Written on the trainer's bucket, then copied here.
      'model_checkpoint_path: "gs://bucket/run/checkpoints-0/ckpt-3"\n')
  _assert_reads(read_official_checkpoint(str(host0)), _official_state())
  only_flax = tmp_path / "only_flax"
  _write_clu_save(only_flax, 2, _official_state(step=1000, shift=0.5), commit=False)
  _write_clu_save(only_flax, 10, _official_state(), commit=False)  # 10 > 2 numerically.
  _assert_reads(read_official_checkpoint(str(only_flax)), _official_state())


def test_state_without_params_wrapper_is_returned_as_is(tmp_path):
  state = _official_state()
  unwrapped = state.replace(params=state.params["params"], ema_params=state.ema_params["params"])
  _write_clu_save(tmp_path / "d", 1, unwrapped)
  _assert_reads(read_official_checkpoint(str(tmp_path / "d")), state)


def test_missing_path_is_named(tmp_path):
  missing = str(tmp_path / "no_such_run" / "checkpoints-0")
  with pytest.raises(ValueError, match="does not exist") as error:
    read_official_checkpoint(missing)
  assert missing in str(error.value)


def test_directory_without_checkpoint_is_named_with_the_expected_files(tmp_path):
  empty = tmp_path / "workdir"
  empty.mkdir()
  (empty / "notes.txt").write_text("not a checkpoint")
  with pytest.raises(ValueError, match="no checkpoint found") as error:
    read_official_checkpoint(str(empty))
  assert str(empty) in str(error.value)
  assert "ckpt-1.flax" in str(error.value) and "'checkpoint'" in str(error.value)
  _write_clu_save(empty / "checkpoints-0", 1, _official_state())
  with pytest.raises(ValueError, match="per-host directories") as error:
    read_official_checkpoint(str(empty))  # The workdir: a hint to pass checkpoints-0.
  assert str(empty / "checkpoints-0") in str(error.value)


def test_state_file_naming_a_missing_flax_file_is_reported(tmp_path):
  host0 = tmp_path / "checkpoints-0"
  _write_clu_save(host0, 1, _official_state())
  os.remove(host0 / "ckpt-1.flax")
  with pytest.raises(ValueError, match="no checkpoint found") as error:
    read_official_checkpoint(str(host0))
  assert str(host0 / "ckpt-1.flax") in str(error.value)
  (host0 / "checkpoint").write_text("garbage\n")
  with pytest.raises(ValueError, match="not a clu/TensorFlow checkpoint state file") as error:
    read_official_checkpoint(str(host0))
  assert str(host0 / "checkpoint") in str(error.value)


def test_multihost_without_a_common_save_is_reported(tmp_path):
  _write_clu_save(tmp_path / "checkpoints-0", 2, _official_state())
  (tmp_path / "checkpoints-1").mkdir()
  base = str(tmp_path / "checkpoints")
  with pytest.raises(ValueError, match="no checkpoint found") as error:
    read_official_checkpoint(base)
  assert base in str(error.value)


@pytest.mark.parametrize("content", [b"", b"hello, not msgpack", b"\xc1", b"\x92\x01\x02"])
def test_file_that_is_not_a_flax_checkpoint_is_named(tmp_path, content):
  path = tmp_path / "ckpt-1.flax"
  path.write_bytes(content)
  with pytest.raises(ValueError, match="not a clu/flax checkpoint") as error:
    read_official_checkpoint(str(path))
  assert str(path) in str(error.value)
  with pytest.raises(ValueError, match="not a clu/flax checkpoint"):
    read_official_checkpoint(str(tmp_path))  # Found as the newest save of the directory.


def test_state_dict_without_official_fields_lists_the_keys_found(tmp_path):
  path = tmp_path / "ckpt-1.flax"
  path.write_bytes(serialization.msgpack_serialize(
      {"step": np.asarray(3), "target": {"w": np.ones(2)}}))
  with pytest.raises(ValueError, match="'ema_params'") as error:
    read_official_checkpoint(str(path))
  message = str(error.value)
  assert str(path) in message and "['step', 'target']" in message and "'params'" in message


def test_reads_what_clu_multihost_checkpoint_writes(tmp_path):
  pytest.importorskip("tensorflow")
  clu_checkpoint = pytest.importorskip("clu.checkpoint")
  base = str(tmp_path / "checkpoints")
  ckpt = clu_checkpoint.MultihostCheckpoint(base, max_to_keep=2, host_id=0)
  prefixes = [ckpt.save(_official_state(step=step, shift=0.25 * step))
              for step in (1232, 1233, 1234)]
  newest = _official_state(step=1234, shift=0.25 * 1234)
  assert sorted(os.listdir(base + "-0")) == [
      "checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.flax", "ckpt-2.index",
      "ckpt-3.data-00000-of-00001", "ckpt-3.flax", "ckpt-3.index"]
  assert prefixes[-1] == os.path.join(base + "-0", "ckpt-3")
  # Local paths, and the same through tf.io.gfile (the branch that gs:// paths take).
  for path in (base, base + "-0", prefixes[-1], "file://" + base, "file://" + prefixes[-1]):
    _assert_reads(read_official_checkpoint(path), newest)
  older = _official_state(step=1233, shift=0.25 * 1233)
  _assert_reads(read_official_checkpoint(prefixes[1]), older)
  # What the official evaluation reads, through clu itself, agrees leaf by leaf.
  state_dict = clu_checkpoint.Checkpoint(base + "-0").restore_dict()
  ours = read_official_checkpoint(base + "-0")
  assert ours["step"] == int(state_dict["step"])
  _assert_trees_equal(ours["ema_params"], state_dict["ema_params"]["params"])
  _assert_trees_equal(ours["params"], state_dict["params"]["params"])
