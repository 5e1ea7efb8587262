"""Tests for vdm_jax.storage.checkpointing: exact round trips, retention, NaN refusal, damage,
crashes,
the integrity record (its damage cases are in test_checkpoint_integrity.py)."""

import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import patience

from vdm_jax.storage import checkpointing
from vdm_jax.storage.checkpointing import CheckpointManager

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@flax.struct.dataclass
class _TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  ema_params: dict
  rng: jax.Array


def _state(seed: int = 0) -> _TrainState:
  """A small train state: params, an optax adam state after one update, a step and a key."""
  key = jax.random.key(seed)
  params = {"gamma": {"gamma_min": jnp.asarray(-7.0 + seed)},
            "net": {"kernel": jax.random.normal(key, (3, 4)), "bias": jnp.zeros((4,))}}
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return _TrainState(step=jnp.asarray(seed + 1, jnp.int32), params=params, opt_state=opt_state,
                     ema_params=jax.tree.map(lambda x: 0.5 * x, params),
                     rng=jax.random.fold_in(key, 7))


def _assert_states_equal(a, b):
  """Exact equality; typed PRNG keys are compared through their key data."""
  as_data = lambda s: s.replace(rng=jax.random.key_data(s.rng))
  chex.assert_trees_all_equal(as_data(a), as_data(b))
  assert jax.dtypes.issubdtype(b.rng.dtype, jax.dtypes.prng_key)


def _abstract(state):
  return jax.eval_shape(lambda: state)


def _saved(tmp_path, steps, **kwargs):
  """A directory holding synchronously saved checkpoints of the given steps."""
  directory = tmp_path / "ckpt"
  with CheckpointManager(directory, async_save=False, **kwargs) as mgr:
    for step in steps:
      assert mgr.save(step, _state(step), metadata={"data_step": step})
  return directory


def test_round_trip_is_exact_with_metadata(tmp_path):
  state = _state()
  with CheckpointManager(tmp_path / "ckpt", async_save=False) as mgr:
    assert mgr.save(5, state, metadata={"data_step": 40, "config": {"lr": 1e-3}})
    step, restored, metadata = mgr.restore(_abstract(state))
  assert step == 5
  assert metadata == {"data_step": 40, "config": {"lr": 1e-3}}
  assert isinstance(restored, _TrainState)
  _assert_states_equal(state, restored)


def test_round_trip_of_plain_dict_with_numpy_leaf(tmp_path):
  state = {"step": jnp.asarray(3), "w": jnp.arange(6.0).reshape(2, 3), "n": np.arange(4.0)}
  with CheckpointManager(tmp_path / "ckpt", async_save=False) as mgr:
    mgr.save(0, state)
    step, restored, metadata = mgr.restore(state)
  assert (step, metadata) == (0, {})
  chex.assert_trees_all_equal(restored, state, strict=False)


def test_restore_without_checkpoints_returns_none(tmp_path):
  with CheckpointManager(tmp_path / "empty") as mgr:
    assert mgr.restore(_abstract(_state())) is None
    assert mgr.latest_step() is None and mgr.all_steps() == []


def test_restore_explicit_step_and_missing_step(tmp_path):
  directory = _saved(tmp_path, [1, 2, 3])
  with CheckpointManager(directory) as mgr:
    step, restored, metadata = mgr.restore(_abstract(_state()), step=2)
    assert step == 2 and metadata == {"data_step": 2}
    _assert_states_equal(_state(2), restored)
    with pytest.raises(ValueError, match="step 9"):
      mgr.restore(_abstract(_state()), step=9)


def test_restore_takes_shardings_of_abstract_state(tmp_path):
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jnp.arange(8.0 * len(jax.devices())).reshape(-1, 2)
  state = {"x": jax.device_put(x, sharded)}
  with CheckpointManager(tmp_path / "ckpt", async_save=False) as mgr:
    mgr.save(1, state)
    for target in (replicated, jax.sharding.SingleDeviceSharding(jax.devices()[1]), sharded):
      abstract = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target)}
      _, restored, _ = mgr.restore(abstract)
      assert restored["x"].sharding == target
      np.testing.assert_array_equal(restored["x"], x)
    # A concrete array as the target: its sharding is used.
    target = jax.device_put(jnp.zeros_like(x), jax.devices()[2])
    _, restored, _ = mgr.restore({"x": target})
    assert restored["x"].sharding == target.sharding
    np.testing.assert_array_equal(restored["x"], x)


def test_max_to_keep(tmp_path):
  directory = _saved(tmp_path, [1, 2, 3, 4], max_to_keep=2)
  assert sorted(os.listdir(directory)) == ["3", "4"]
  with CheckpointManager(directory) as mgr:
    assert mgr.all_steps() == [3, 4] and mgr.latest_step() == 4


def test_save_interval_force_and_existing_step(tmp_path):
  with CheckpointManager(tmp_path / "ckpt", save_interval_steps=3, async_save=False) as mgr:
    assert not mgr.save(1, _state())
    assert not mgr.save(2, _state())
    assert mgr.save(3, _state())
    assert mgr.save(4, _state(), force=True)
    assert not mgr.save(3, _state(), force=True)  # already saved: kept, not rewritten
    assert mgr.all_steps() == [3, 4]


@pytest.mark.parametrize("where", ["params", "numpy"])
def test_refuses_non_finite_state_and_writes_nothing(tmp_path, where):
  state = _state()
  if where == "params":
    state = state.replace(params={**state.params, "net": {**state.params["net"],
                                                          "bias": jnp.full((4,), jnp.nan)}})
    leaf = "bias"
  else:
    state = {"ok": jnp.ones(2), "host": np.array([1.0, np.inf])}
    leaf = "host"
  directory = tmp_path / "ckpt"
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.raises(ValueError, match=rf"step 7.*{leaf}"):
      mgr.save(7, state)
    assert mgr.all_steps() == []
  assert os.listdir(directory) == []


def test_refuses_non_json_metadata(tmp_path):
  with CheckpointManager(tmp_path / "ckpt", async_save=False) as mgr:
    with pytest.raises(ValueError, match="metadata"):
      mgr.save(1, _state(), metadata={"bad": object()})
    assert mgr.all_steps() == []


def _truncate_data_files(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  assert files
  for path in files:
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)


def _delete_state_metadata(step_dir):
  os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _delete_json_metadata(step_dir):
  os.remove(os.path.join(step_dir, "metadata", "metadata"))


# orbax can leave an asyncio callback behind after a failed read; it is harmless here.
_IGNORE_ORBAX_LOOP = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_IGNORE_ORBAX_LOOP
@pytest.mark.parametrize(
    "damage", [_truncate_data_files, _delete_state_metadata, _delete_json_metadata])
def test_damaged_newest_falls_back_with_warning(tmp_path, damage):
  directory = _saved(tmp_path, [1, 2])
  damage(os.path.join(directory, "2"))
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning, match="step 2"):
      step, restored, metadata = mgr.restore(_abstract(_state()))
    assert step == 1 and metadata == {"data_step": 1}
    _assert_states_equal(_state(1), restored)
    # Training resumes from step 1; saving step 2 again replaces the unreadable checkpoint.
    assert mgr.save(2, _state(2), metadata={"data_step": 2})
    step, restored, _ = mgr.restore(_abstract(_state()))
  assert step == 2
  _assert_states_equal(_state(2), restored)


@_IGNORE_ORBAX_LOOP
def test_all_damaged_raises(tmp_path):
  directory = _saved(tmp_path, [1, 2])
  for step in ("1", "2"):
    _truncate_data_files(os.path.join(directory, step))
  with CheckpointManager(directory) as mgr:
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match=r"(?s)step 2.*step 1"):
      mgr.restore(_abstract(_state()))


@pytest.mark.parametrize("tmp_name", ["3.orbax-checkpoint-tmp", "3.orbax-checkpoint-tmp-1712"])
def test_temporary_directories_are_ignored(tmp_path, tmp_name):
  directory = _saved(tmp_path, [1])
  # A leftover of an interrupted save: even a complete copy must not be listed or loaded.
  shutil.copytree(directory / "1", directory / tmp_name)
  with CheckpointManager(directory) as mgr:
    assert mgr.all_steps() == [1] and mgr.latest_step() == 1
    step, _, _ = mgr.restore(_abstract(_state()))
  assert step == 1


def test_async_save_then_wait(tmp_path):
  directory = tmp_path / "ckpt"
  state = _state(3)
  mgr = CheckpointManager(directory, async_save=True)
  assert mgr.save(10, state, metadata={"data_step": 10})
  mgr.wait_until_finished()
  assert os.listdir(directory) == ["10"]
  mgr.close()
  with CheckpointManager(directory) as other:
    step, restored, _ = other.restore(_abstract(state))
  assert step == 10
  _assert_states_equal(state, restored)


def test_bad_constructor_arguments(tmp_path):
  with pytest.raises(ValueError, match="max_to_keep"):
    CheckpointManager(tmp_path / "a", max_to_keep=0)
  with pytest.raises(ValueError, match="save_interval_steps"):
    CheckpointManager(tmp_path / "b", save_interval_steps=0)


_CRASHING_CHILD = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from vdm_jax.storage.checkpointing import CheckpointManager
    mgr = CheckpointManager(sys.argv[1], async_save=False)
    mgr.save(1, {"w": jnp.arange(4.0)}, metadata={"data_step": 1})
    big = {"w": jax.random.normal(jax.random.key(0), (50_000_000,))}  # 200 MB
    big["w"].block_until_ready()
    print("saving 2", flush=True)
    mgr.save(2, big)
    print("saved 2", flush=True)
""")


def _wait_for_tmp_dir(directory, proc, timeout=patience(300)):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    tmp = [n for n in names if n.startswith("2.") and "tmp" in n]
    if tmp:
      return tmp
    time.sleep(0.001)
  return []


def test_killed_during_save_leaves_previous_checkpoint_usable(tmp_path):
  directory = str(tmp_path / "ckpt")
  script = tmp_path / "child.py"
  script.write_text(_CRASHING_CHILD)
  env = {**os.environ, "PYTHONPATH": _REPO, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, str(script), directory], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    tmp = _wait_for_tmp_dir(directory, proc)
    assert tmp, f"the child never started saving step 2 (exit code {proc.poll()})"
    time.sleep(0.05)  # let it write part of the data
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=patience(120)) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=patience(120))
  assert "2" not in os.listdir(directory), "the save finished before the kill"
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with CheckpointManager(directory, async_save=False) as mgr:
    assert mgr.all_steps() == [1]
    step, restored, metadata = mgr.restore(abstract)
    assert (step, metadata) == (1, {"data_step": 1})
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    # The interrupted step can be saved again over the leftover temporary directory.
    assert mgr.save(2, {"w": jnp.ones(4)})
    assert mgr.restore(abstract)[0] == 2


def test_partial_restore_reads_only_the_named_fields(tmp_path):
  """A sub-tree of the saved state (by field name) comes back, and nothing else: the optimiser
  state of a train state is never read."""
  state = _state(3)
  with CheckpointManager(tmp_path / "ckpt", async_save=False) as mgr:
    mgr.save(4, state, metadata={"data_step": 4})
  full = _abstract(state)
  part = {"step": full.step, "ema_params": full.ema_params}
  with CheckpointManager(tmp_path / "ckpt") as mgr:
    step, restored, metadata = mgr.restore(part, partial=True)
  assert (step, metadata) == (4, {"data_step": 4})
  assert set(restored) == {"step", "ema_params"}
  chex.assert_trees_all_equal(restored, {"step": state.step, "ema_params": state.ema_params},
                              strict=False)


def _sha256_of(items):
  """SHA-256 over length-prefixed byte strings, computed here independently of the library."""
  digest = hashlib.sha256()
  for item in items:
    digest.update(len(item).to_bytes(8, "little"))
    digest.update(item)
  return digest.hexdigest()


def test_integrity_record_is_the_documented_digest(tmp_path):
  """The metadata item holds, per top-level field, SHA-256 over (path, dtype, shape) JSON and
  the little-endian bytes of each leaf in sorted path order, and a digest of the metadata."""
  state = {"w": jnp.arange(3.0), "net": {"z": jnp.asarray(7, jnp.int32),
                                         "a": jnp.ones((2, 2), jnp.bfloat16)}}
  with CheckpointManager(tmp_path / "ckpt", async_save=False) as mgr:
    mgr.save(1, state, metadata={"data_step": 4})
  with open(tmp_path / "ckpt" / "1" / "metadata" / "metadata") as f:
    stored = json.load(f)
  record = stored.pop("_integrity")
  assert stored == {"data_step": 4}
  header = lambda path, dtype, shape: json.dumps([path, dtype, shape]).encode()
  w_bytes = np.arange(3.0, dtype="<f4").tobytes()
  a_bytes = bytes.fromhex("803f") * 4                   # bfloat16 1.0, little-endian
  z_bytes = (7).to_bytes(4, "little")
  assert record["format"] == 1 and record["algorithm"] == "sha256"
  assert record["fields"]["w"] == {
      "sha256": _sha256_of([header([], "float32", [3]), w_bytes]),
      "structure": _sha256_of([header([], "float32", [3])]), "leaves": 1}
  assert record["fields"]["net"]["sha256"] == _sha256_of([
      header(["a"], "bfloat16", [2, 2]), a_bytes, header(["z"], "int32", []), z_bytes])
  assert record["metadata"] == hashlib.sha256(b'{"data_step": 4}').hexdigest()


def test_stored_tree_gives_the_saved_shapes_and_dtypes(tmp_path):
  state = {"w": jnp.ones((2, 3)), "net": {"b": jnp.zeros((4,), jnp.int32)}}
  directory = tmp_path / "ckpt"
  with CheckpointManager(directory, async_save=False) as mgr:
    mgr.save(1, state)
  os.makedirs(directory / "2.orbax-checkpoint-tmp-7")   # an unfinished save is not a step
  assert checkpointing.complete_steps(str(directory)) == [1]
  assert checkpointing.complete_steps(str(tmp_path / "absent")) == []
  tree = checkpointing.stored_tree(str(directory), 1)
  with pytest.raises(ValueError, match="step 2"):
    checkpointing.stored_tree(str(directory), 2)
  assert (tree["w"].shape, tree["w"].dtype) == ((2, 3), jnp.float32)
  assert (tree["net"]["b"].shape, tree["net"]["b"].dtype) == ((4,), jnp.int32)


def test_killed_during_a_save_to_a_bucket_leaves_the_previous_checkpoint_usable(gcs, gs_dir):
  """In GCS, Orbax writes step 2 in place and its commit marker last: a process killed while
  writing leaves objects of step 2 that no listing takes for a checkpoint; step 1 restores, and
  step 2 can be saved again."""
  from vdm_jax.storage import rundir
  directory = gs_dir + "/ckpt"
  child = _CRASHING_CHILD.replace("(50_000_000,)", "(5_000_000,)")   # 20 MB through the emulator
  env = {**os.environ, **gcs.env, "PYTHONPATH": _REPO, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-c", child, directory], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + patience(300)
    while (time.monotonic() < deadline and proc.poll() is None
           and not rundir.list_names(directory + "/2")):
      time.sleep(0.01)
    assert rundir.list_names(directory + "/2"), f"step 2 was never started ({proc.poll()})"
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=patience(120)) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(timeout=patience(120))
  assert checkpointing.complete_steps(directory) == [1], "the save finished before the kill"
  abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with CheckpointManager(directory, async_save=False) as mgr:
    assert mgr.all_steps() == [1]
    step, restored, metadata = mgr.restore(abstract)
    assert (step, metadata) == (1, {"data_step": 1})
    np.testing.assert_array_equal(restored["w"], np.arange(4.0))
    assert mgr.save(2, {"w": jnp.ones(4)})
    assert mgr.restore(abstract)[0] == 2
