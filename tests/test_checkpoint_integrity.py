"""Checkpoints that prove their integrity.

Damage is made on disk as a user's storage would: random bytes, truncated or deleted files,
silent corruption that still decodes. A restore must fall back past it with a warning naming
the step and why, never return NaN or garbage, never delete anything itself, and never take a
transient read error, a changed target or a checkpoint rotated away mid-read for damage.
"""

import errno
import glob
import json
import os
import re
import shutil
import threading
import warnings

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import fresh_run
from vdm_jax.storage import checkpointing
from vdm_jax.training import runs
from vdm_jax.storage.checkpointing import CheckpointManager

# orbax can leave an asyncio callback behind after a failed read; it is harmless here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  rng: jax.Array
  frozen: dict = flax.struct.field(default_factory=dict)


def _state(seed: int) -> _State:
  """A small train state whose every array depends on `seed`."""
  key = jax.random.key(seed)
  params = {"net": {"kernel": jax.random.normal(key, (64, 64)), "bias": jnp.full((4,), seed)},
            "schedule": {"gamma_min": jnp.asarray(-7.0 + seed)}}
  opt_state = optax.adam(1e-3).init(params)
  return _State(step=jnp.asarray(seed, jnp.int32), params=params,
                ema_params=jax.tree.map(lambda x: 0.5 * x + 1.0, params), opt_state=opt_state,
                rng=jax.random.fold_in(key, 1))


def _abstract():
  return jax.eval_shape(lambda: _state(0))


def _same(a, b):
  key_data = lambda s: s.replace(rng=jax.random.key_data(s.rng))
  chex.assert_trees_all_equal(key_data(a), key_data(b))


def _saved(tmp_path, steps, **kwargs):
  directory = tmp_path / "ckpt"
  with CheckpointManager(directory, async_save=False, max_to_keep=None, **kwargs) as mgr:
    for step in steps:
      assert mgr.save(step, _state(step), metadata={"data_step": step})
  return directory


def _data_files(step_dir) -> list[str]:
  """The array data files of a checkpoint, largest first."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  assert files, f"no array data files under {step_dir}"
  return sorted(files, key=os.path.getsize, reverse=True)


def _largest_data_file(step_dir) -> str:
  return _data_files(step_dir)[0]


def _random_bytes(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.write(np.random.default_rng(0).bytes(size))
  assert os.path.getsize(path) == size


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _restore_quietly(mgr, target, **kwargs):
  """mgr.restore, asserting that it warns about nothing."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = mgr.restore(target, **kwargs)
  relevant = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
  assert not relevant, relevant
  return result


def _corrupt_silently(step_dir, probe) -> str:
  """Writes 8 random bytes (same size: the file keeps its length) inside an array data file of
  `step_dir` where the compressed stream still decodes without an error, i.e. where only a
  digest can notice: `probe()` reads the step and returns the error message (or None). Tries
  the largest file first. Returns the file changed."""
  rng = np.random.default_rng(1)
  messages = []
  for path in _data_files(step_dir):
    with open(path, "rb") as f:
      original = f.read()
    for offset in range(0, len(original) - 8, max(1, len(original) // 48)):
      with open(path, "r+b") as f:
        f.seek(offset)
        f.write(rng.bytes(8))
      message = probe()
      if message is not None and "digest" in message:
        return path
      messages.append(message)
      with open(path, "wb") as f:
        f.write(original)
  raise AssertionError(f"no silent corruption found in {step_dir}; the reads said {messages}")


def _probe_step(directory, step):
  def probe():
    with CheckpointManager(directory, async_save=False) as mgr:
      try:
        mgr.restore(_abstract(), step=step)
      except checkpointing.CheckpointDamagedError as e:
        return e.reason
    return None
  return probe


# ---- Damage is detected, reported with the step and the reason, and skipped ----

@pytest.mark.parametrize("damage", [_random_bytes, _truncate, os.remove])
def test_damaged_data_file_falls_back_to_the_previous_step(tmp_path, damage):
  directory = _saved(tmp_path, [1, 2])
  damage(_largest_data_file(directory / "2"))
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning, match=r"step 2 .* is damaged") as caught:
      step, restored, metadata = mgr.restore(_abstract())
  assert (step, metadata) == (1, {"data_step": 1})
  _same(restored, _state(1))
  assert len([w for w in caught if "damaged" in str(w.message)]) == 1
  assert sorted(os.listdir(directory)) == ["1", "2"]   # restore deletes nothing


def test_silent_corruption_is_caught_by_the_digest(tmp_path):
  """Bytes changed inside the compressed stream: orbax decodes them into other numbers (the
  reported `bpd nan` and all-zero samples); the digest refuses them."""
  directory = _saved(tmp_path, [1, 2])
  _corrupt_silently(directory / "2", _probe_step(directory, 2))
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning, match=r"step 2 .*digest mismatch"):
      step, restored, _ = mgr.restore(_abstract())
  assert step == 1
  _same(restored, _state(1))


def test_non_finite_values_restored_are_refused(tmp_path, monkeypatch):
  """A NaN cannot be saved through `save`; one written around its check (the digest then
  matches the NaN) is still refused on restore."""
  directory = _saved(tmp_path, [1])
  bad = _state(2)
  bad = bad.replace(ema_params={**bad.ema_params, "schedule": {"gamma_min": jnp.asarray(jnp.nan)}})
  with monkeypatch.context() as patch:
    patch.setattr(checkpointing, "non_finite_leaves", lambda state: [])
    with CheckpointManager(directory, async_save=False) as mgr:
      assert mgr.save(2, bad)
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning, match=r"step 2 .*non-finite values in "
                                            r"\['ema_params/schedule/gamma_min'\]"):
      step, restored, _ = mgr.restore(_abstract())
  assert step == 1
  chex.assert_tree_all_finite(restored.ema_params)


def test_all_damaged_raises_and_names_every_step(tmp_path):
  directory = _saved(tmp_path, [1, 2])
  for step in ("1", "2"):
    _truncate(_largest_data_file(directory / step))
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning), pytest.raises(checkpointing.NoUsableCheckpointError,
                                                     match=r"(?s)step 2: .*step 1: "):
      mgr.restore(_abstract())


def test_explicit_damaged_step_raises(tmp_path):
  directory = _saved(tmp_path, [1, 2])
  _truncate(_largest_data_file(directory / "2"))
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.raises(checkpointing.CheckpointDamagedError, match="step 2"):
      mgr.restore(_abstract(), step=2)


# ---- Only positive damage counts, and nothing is deleted unconfirmed ----

def _failing_reads(monkeypatch, error, *, step, times=None):
  """orbax's restore of `step` raises `error` (the first `times` reads; None: every read)."""
  orbax_manager = checkpointing.ocp.CheckpointManager
  original, calls = orbax_manager.restore, []

  def restore(self, s, *args, **kwargs):
    if s == step and (times is None or len(calls) < times):
      calls.append(s)
      raise error
    return original(self, s, *args, **kwargs)

  monkeypatch.setattr(orbax_manager, "restore", restore)
  return calls


@pytest.mark.parametrize("error", [
    OSError(errno.EIO, "Input/output error"),
    PermissionError(errno.EACCES, "Permission denied"),
    ValueError("UNAVAILABLE: Error reading local file: connection reset"),
    RuntimeError("an error nobody has classified"),
], ids=["EIO", "permission", "tensorstore-unavailable", "unknown"])
def test_transient_error_propagates_and_marks_nothing(tmp_path, monkeypatch, error):
  directory = _saved(tmp_path, [1, 2])
  with CheckpointManager(directory, async_save=False, max_to_keep=None) as mgr:
    with monkeypatch.context() as patch:
      _failing_reads(patch, error, step=2)
      with pytest.raises(checkpointing.CheckpointReadError,
                         match=r"step 2 .*does not show damage") as raised:
        mgr.restore(_abstract())
    assert raised.value.__cause__ is error and isinstance(raised.value, OSError)
    # The next saves neither replace nor delete step 2: it was never marked unusable.
    assert not mgr.save(2, _state(5))
    assert mgr.save(3, _state(3))
    assert mgr.all_steps() == [1, 2, 3]
    step, restored, _ = mgr.restore(_abstract(), step=2)
  _same(restored, _state(2))


def test_damage_is_confirmed_by_a_second_read_before_deletion(tmp_path, monkeypatch):
  """A file that looked missing once (a flaky file system) marks the step; the next save
  re-reads it, finds it intact, and keeps it."""
  directory = _saved(tmp_path, [1, 2])
  with CheckpointManager(directory, async_save=False, max_to_keep=None) as mgr:
    with monkeypatch.context() as patch:
      _failing_reads(patch, FileNotFoundError(errno.ENOENT, "No such file", "x"), step=2, times=1)
      with pytest.warns(RuntimeWarning, match=r"step 2 .*missing file"):
        assert mgr.restore(_abstract())[0] == 1
    assert not mgr.save(2, _state(5))   # re-read: intact, so kept and not overwritten
    step, restored, _ = mgr.restore(_abstract())
  assert step == 2
  _same(restored, _state(2))


def test_confirmed_damage_is_replaced_by_the_next_save(tmp_path):
  directory = _saved(tmp_path, [1, 2])
  _truncate(_largest_data_file(directory / "2"))
  with CheckpointManager(directory, async_save=False, max_to_keep=None) as mgr:
    with pytest.warns(RuntimeWarning, match="step 2"):
      assert mgr.restore(_abstract())[0] == 1
    assert mgr.save(2, _state(2))
    step, restored, _ = mgr.restore(_abstract())
  assert step == 2
  _same(restored, _state(2))


def test_damaged_step_is_not_kept_while_intact_ones_are_rotated_away(tmp_path):
  """Resumed from step 2 past a damaged step 4 with max_to_keep=2: orbax would keep the damaged
  4 beside the new 3 and rotate the intact 2 away (checkpoints lost that way before); the save
  deletes the confirmed-damaged 4 first, so 2 and 3 are kept."""
  directory = _saved(tmp_path, [2, 4])
  _truncate(_largest_data_file(directory / "4"))
  with CheckpointManager(directory, async_save=False, max_to_keep=2) as mgr:
    with pytest.warns(RuntimeWarning, match="step 4"):
      assert mgr.restore(_abstract())[0] == 2
    assert mgr.save(3, _state(3))
    assert mgr.all_steps() == [2, 3]
    step, restored, _ = _restore_quietly(mgr, _abstract())
  assert step == 3
  _same(restored, _state(3))


def test_changed_target_structure_is_not_damage(tmp_path):
  """A target unlike the saved state (a changed config) names the fields and marks nothing:
  were it damage, every checkpoint would be marked and the next save would delete them."""
  directory = _saved(tmp_path, [1, 2])
  wider = jax.eval_shape(lambda: _state(0).replace(
      ema_params={"net": {"kernel": jnp.zeros((64, 65)), "bias": jnp.zeros(4)},
                  "schedule": {"gamma_min": jnp.zeros(())}}))
  with CheckpointManager(directory, async_save=False, max_to_keep=None) as mgr:
    with pytest.raises(checkpointing.CheckpointStructureError, match="ema_params") as raised:
      _restore_quietly(mgr, wider)
    assert raised.value.fields == ["ema_params"]
    assert not mgr.save(2, _state(5))
    assert mgr.all_steps() == [1, 2]
    _same(mgr.restore(_abstract())[1], _state(2))


# ---- A checkpoint rotated away while being read is not damage ----

def _vanishing_reads(monkeypatch, directory, step, *, then=None, delay=None):
  """The first read of `step` deletes it first, as a trainer's rotation would (the files at
  once and the directory `delay` seconds later, or all at once); `then()` runs after that."""
  orbax_manager = checkpointing.ocp.CheckpointManager
  original, done = orbax_manager.restore, []

  def restore(self, s, *args, **kwargs):
    if s == step and not done:
      done.append(s)
      step_dir = os.path.join(directory, str(step))
      if delay is None:
        shutil.rmtree(step_dir)
      else:
        for path in glob.glob(os.path.join(step_dir, "**", "*"), recursive=True):
          if os.path.isfile(path):
            os.remove(path)
        threading.Timer(delay, shutil.rmtree, (step_dir,)).start()
      if then is not None:
        then()
    return original(self, s, *args, **kwargs)

  monkeypatch.setattr(orbax_manager, "restore", restore)
  return done


@pytest.mark.parametrize("delay", [None, 0.2], ids=["at-once", "files-then-directory"])
def test_step_deleted_while_read_is_retried_without_a_damage_warning(tmp_path, monkeypatch,
                                                                     delay):
  directory = _saved(tmp_path, [1, 2])
  with CheckpointManager(directory, async_save=False) as mgr:
    done = _vanishing_reads(monkeypatch, directory, 2, delay=delay)
    step, restored, _ = _restore_quietly(mgr, _abstract())
  assert done == [2] and step == 1
  _same(restored, _state(1))


def test_rotation_mid_read_retries_on_the_newest_complete_step(tmp_path, monkeypatch):
  """keep_checkpoints=1: the trainer saves 3 and rotates 2 away while the evaluator reads 2."""
  directory = _saved(tmp_path, [2])

  def trainer_saves_3():
    with CheckpointManager(directory, async_save=False, max_to_keep=None) as trainer:
      trainer.save(3, _state(3))

  with CheckpointManager(directory, async_save=False) as mgr:
    _vanishing_reads(monkeypatch, directory, 2, then=trainer_saves_3)
    step, restored, _ = _restore_quietly(mgr, _abstract())
  assert step == 3
  _same(restored, _state(3))


def test_retries_after_rotation_are_bounded(tmp_path, monkeypatch):
  """Each read finds its step renamed to the next one (rotated away, a newer one saved): the
  restore gives up with a clear error instead of chasing the trainer for ever."""
  directory = _saved(tmp_path, [1])
  original, renames = checkpointing.ocp.CheckpointManager.restore, []

  def restore(self, s, *args, **kwargs):
    if len(renames) < 50:   # then it stops moving (a restore without a bound succeeds)
      renames.append(s)
      os.rename(os.path.join(directory, str(s)), os.path.join(directory, str(s + 1)))
    return original(self, s, *args, **kwargs)

  monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "restore", restore)
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.raises(checkpointing.NoUsableCheckpointError, match="deleted while being read"):
      _restore_quietly(mgr, _abstract())
  assert len(renames) < 50


def test_all_steps_gone_mid_read_is_an_error_not_a_fresh_start(tmp_path, monkeypatch):
  directory = _saved(tmp_path, [1, 2])
  original = checkpointing.ocp.CheckpointManager.restore

  def restore(self, s, *args, **kwargs):
    shutil.rmtree(os.path.join(directory, str(s)), ignore_errors=True)
    return original(self, s, *args, **kwargs)

  monkeypatch.setattr(checkpointing.ocp.CheckpointManager, "restore", restore)
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.raises(checkpointing.NoUsableCheckpointError, match="disappeared"):
      _restore_quietly(mgr, _abstract())


# ---- checkpoints of older versions, and partial restores ----

def _edit_metadata(step_dir, edit):
  path = os.path.join(step_dir, "metadata", "metadata")
  with open(path) as f:
    metadata = json.load(f)
  edit(metadata)
  with open(path, "w") as f:
    json.dump(metadata, f)


def test_checkpoint_without_record_restores_with_one_warning(tmp_path):
  directory = _saved(tmp_path, [1, 2])
  _edit_metadata(directory / "2", lambda m: m.pop("_integrity"))   # as older versions wrote
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning, match=r"step 2 .*cannot be verified") as caught:
      step, restored, metadata = mgr.restore(_abstract())
  assert (step, metadata) == (2, {"data_step": 2})
  assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == 1
  _same(restored, _state(2))


def test_checkpoint_without_record_is_still_checked_for_non_finite_values(tmp_path, monkeypatch):
  directory = _saved(tmp_path, [1])
  with monkeypatch.context() as patch:
    patch.setattr(checkpointing, "non_finite_leaves", lambda state: [])
    with CheckpointManager(directory, async_save=False) as mgr:
      mgr.save(2, _state(2).replace(params={**_state(2).params, "net": {
          "kernel": jnp.full((64, 64), jnp.inf), "bias": jnp.zeros(4)}}))
  _edit_metadata(directory / "2", lambda m: m.pop("_integrity"))
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning, match=r"step 2 .*non-finite values in \['params/net/kernel"):
      assert mgr.restore(_abstract())[0] == 1


def test_changed_metadata_is_caught_by_the_digest(tmp_path):
  directory = _saved(tmp_path, [1, 2])
  _edit_metadata(directory / "2", lambda m: m.update(data_step=1000))
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning, match=r"step 2 .*digest mismatch in its metadata"):
      step, _, metadata = mgr.restore(_abstract())
  assert (step, metadata) == (1, {"data_step": 1})


def _partial_target():
  full = _abstract()
  return {"step": full.step, "ema_params": full.ema_params, "frozen": full.frozen}


def _tamper_digest(field):
  def edit(metadata):
    entry = metadata["_integrity"]["fields"][field]
    entry["sha256"] = "0" * 64
  return edit


def test_partial_restore_verifies_the_fields_it_reads(tmp_path):
  """runs.load_run reads step / ema_params / frozen: their digests are checked, and a
  mismatch in a field it does not read (the optimiser state) does not matter to it."""
  directory = _saved(tmp_path, [1, 2, 3])
  _edit_metadata(directory / "3", _tamper_digest("ema_params"))
  _edit_metadata(directory / "2", _tamper_digest("opt_state"))
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning, match=r"step 3 .*digest mismatch in field 'ema_params'"):
      step, restored, _ = mgr.restore(_partial_target(), partial=True)
  assert step == 2 and set(restored) == {"step", "ema_params", "frozen"}
  chex.assert_trees_all_equal(restored["ema_params"], _state(2).ema_params)
  with CheckpointManager(directory, async_save=False) as mgr:   # the full state: also not 2
    with pytest.warns(RuntimeWarning) as caught:
      assert mgr.restore(_abstract())[0] == 1
  messages = [str(w.message) for w in caught]
  assert any(re.search(r"step 2 .*digest mismatch in field 'opt_state'", m) for m in messages)


def test_partial_restore_falls_back_past_silent_corruption(tmp_path):
  directory = _saved(tmp_path, [1, 2])

  def probe():
    with CheckpointManager(directory, async_save=False) as mgr:
      try:
        mgr.restore(_partial_target(), step=2, partial=True)
      except checkpointing.CheckpointDamagedError as e:
        return e.reason
    return None

  _corrupt_silently(directory / "2", probe)
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning, match=r"step 2 .*digest mismatch in field 'ema_params'"):
      step, restored, _ = mgr.restore(_partial_target(), partial=True)
  assert step == 1
  chex.assert_trees_all_equal(restored["ema_params"], _state(1).ema_params)


def test_save_refuses_the_reserved_metadata_key(tmp_path):
  with CheckpointManager(tmp_path / "ckpt", async_save=False) as mgr:
    with pytest.raises(ValueError, match="_integrity"):
      mgr.save(1, _state(1), metadata={"_integrity": {}})


# ---- end to end: a run directory whose newest checkpoint is damaged ----

def _smoke_run(tmp_path, smoke_config, steps, ema_offset=0.0):
  """A run directory of the smoke config with one checkpoint per step (EMA = init + step +
  ema_offset)."""
  workdir = tmp_path / "run"
  _, rep, fresh = fresh_run(smoke_config, workdir)
  emas = {}
  with checkpointing.CheckpointManager(workdir / "checkpoints", async_save=False) as manager:
    for step in steps:
      emas[step] = jax.tree.map(lambda p, s=step: p + s + ema_offset, fresh.params)
      manager.save(step, fresh.replace(
          ema_params=emas[step], step=jax.device_put(jnp.asarray(step, jnp.int32), rep)),
                   force=True)
  return workdir, emas


def test_load_run_skips_a_newest_checkpoint_whose_arrays_decode_to_nan(tmp_path, smoke_config,
                                                                       monkeypatch):
  """The reported case: the arrays of step 7 read back without an error but as other numbers
  (here NaN: step 7's array files replaced by those of a NaN state of the same structure, its
  metadata kept), so `vdm-jax eval` printed `bpd nan`. load_run must return step 3, finite."""
  workdir, emas = _smoke_run(tmp_path, smoke_config, [3, 7])
  with monkeypatch.context() as patch:   # the NaN state, written around save's check
    patch.setattr(checkpointing, "non_finite_leaves", lambda state: [])
    nan_dir, _ = _smoke_run(tmp_path / "nan", smoke_config, [7], ema_offset=jnp.nan)
  ckpt = workdir / "checkpoints"
  shutil.rmtree(ckpt / "7" / "state")
  shutil.copytree(nan_dir / "checkpoints" / "7" / "state", ckpt / "7" / "state")
  with pytest.warns(RuntimeWarning, match=r"step 7 .*digest mismatch in field 'ema_params'"):
    run = runs.load_run(str(workdir))
  assert run.step == 3
  chex.assert_tree_all_finite(run.params)
  chex.assert_trees_all_equal(run.params, emas[3])
  assert sorted(os.listdir(ckpt)) == ["3", "7"]   # evaluation deletes nothing


def test_load_run_reports_a_damaged_requested_step_as_a_run_error(tmp_path, smoke_config):
  workdir, _ = _smoke_run(tmp_path, smoke_config, [3, 7])
  for path in _data_files(workdir / "checkpoints" / "7"):
    _truncate(path)
  with pytest.raises(runs.RunError, match=r"step 7 .* is damaged"):
    runs.load_run(str(workdir), step=7)
  for path in _data_files(workdir / "checkpoints" / "3"):
    _truncate(path)
  with pytest.warns(RuntimeWarning), pytest.raises(runs.RunError, match="None of the checkpoints"):
    runs.load_run(str(workdir))


# ---- the same guarantees for checkpoints in a bucket (the GCS emulator) ----

def _walk(folder):
  """Every object under `folder` (local or gs://), recursively."""
  from vdm_jax.storage import rundir
  for name in rundir.list_names(folder):
    path = rundir.join(folder, name)
    if rundir.is_dir(path):
      yield from _walk(path)
    else:
      yield path


def test_silent_corruption_in_a_bucket_is_refused_by_the_digest_and_skipped(gs_dir):
  """Bytes changed inside an array data object of the newest checkpoint in a bucket, where the
  compressed stream still decodes: the digest refuses it, the restore falls back to the step
  before and keeps the damaged one."""
  from vdm_jax.storage import rundir
  directory = gs_dir + "/ckpt"
  with CheckpointManager(directory, async_save=False, max_to_keep=None) as mgr:
    for step in (1, 2):
      assert mgr.save(step, _state(step), metadata={"data_step": step})
  files = [p for p in _walk(directory + "/2/state") if "/d/" in p]
  assert files, list(_walk(directory + "/2"))
  path = max(files, key=lambda p: len(rundir.read_bytes(p)))
  original, rng, probe = rundir.read_bytes(path), np.random.default_rng(1), _probe_step(directory, 2)
  for offset in range(0, len(original) - 8, max(1, len(original) // 48)):
    rundir.write_bytes(path, original[:offset] + rng.bytes(8) + original[offset + 8:])
    message = probe()
    if message is not None and "digest" in message:
      break
  else:
    raise AssertionError("no silent corruption found")
  with CheckpointManager(directory, async_save=False) as mgr:
    with pytest.warns(RuntimeWarning, match=r"step 2 .*digest mismatch"):
      step, restored, metadata = mgr.restore(_abstract())
  assert (step, metadata) == (1, {"data_step": 1})
  _same(restored, _state(1))
  assert checkpointing.complete_steps(directory) == [2, 1]   # nothing deleted by a restore
