"""Test helpers that ship with the package: a GCS emulator on loopback (`gcs_emulator`), for the
test suite and for checking bucket runs on a machine without cloud access."""
