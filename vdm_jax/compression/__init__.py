"""Lossless compression with a trained VDM: the bits-back coder over the T-step chain, many images
as one stream, the file format, `vdm-jax compress` / `decompress`."""
