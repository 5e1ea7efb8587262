"""Shared foundations: named registries, argument validators, devices and the compiled programs' XLA
options."""
