"""The official google-research/vdm models: config and parameter conversion, reading clu
checkpoints, `vdm-jax import-official`."""
