"""Data sets by name (the offline digits and photo patches, TFDS) and the grain pipelines that batch
them for every process."""
