"""Tests for vdm_jax.apps.bench_report: XLA's cost analysis read in every form, the markdown
table and the JSON record of benchmark results."""

import json

from vdm_jax.apps import bench_report


def test_markdown_shows_known_columns_scaled_and_missing_values_as_dashes():
  rows = [{"name": "a", "backend": "cpu", "params": 1234567, "step_s": 0.0125, "mfu": None},
          {"name": "b", "params": 5, "flops_per_step": 3e9}]
  table = bench_report.format_markdown(rows).splitlines()
  assert table[0] == "| config | backend | params | step (ms) | GFLOP/step |"
  assert table[1] == "|---|---|---|---|---|"
  assert table[2] == "| a | cpu | 1,234,567 | 12.5 | - |"
  assert table[3] == "| b | - | 5 | - | 3 |"
  one = bench_report.format_markdown(rows[0]).splitlines()   # one dict: one row, its columns
  assert one == ["| config | backend | params | step (ms) |", "|---|---|---|---|",
                 "| a | cpu | 1,234,567 | 12.5 |"]


def test_json_record_holds_the_results_and_the_machine(tmp_path):
  path = bench_report.write_json(tmp_path / "out" / "b.json", [{"x": 1.5}], note="n")
  record = json.loads(path.read_text())
  assert record["results"] == [{"x": 1.5}] and record["note"] == "n"
  assert {"date", "jax", "backend", "device_kind", "cpu_count", "python"} <= set(
      record["environment"])


class _FakeCompiled:
  def __init__(self, cost):
    self._cost = cost

  def cost_analysis(self):
    if isinstance(self._cost, Exception):
      raise self._cost
    return self._cost


def test_compiled_flops_in_every_form_of_cost_analysis():
  assert bench_report.compiled_flops(_FakeCompiled({"flops": 10.0})) == 10.0
  assert bench_report.compiled_flops(_FakeCompiled([{"flops": 12.0}])) == 12.0   # older jax
  assert bench_report.compiled_flops(_FakeCompiled([])) is None
  assert bench_report.compiled_flops(_FakeCompiled({"flops": -1.0})) is None
  assert bench_report.compiled_flops(_FakeCompiled(NotImplementedError())) is None
