"""The run store: a run folder's on-disk contract (folder), a job's identity, where a run came from (provenance),
W&B tracking, a sweep's progress, file locks. Torch-free: the analysis reads runs through it alone."""
