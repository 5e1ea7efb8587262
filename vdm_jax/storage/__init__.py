"""Run directories anywhere (a local disk or a bucket): the package's only file-system module
(rundir), checkpoints and their integrity, metric writers."""
