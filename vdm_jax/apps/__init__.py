"""Using runs: `vdm-jax eval` / `sample`, the benchmark and its report, `vdm-jax launch`."""
