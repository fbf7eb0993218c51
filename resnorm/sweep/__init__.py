"""Sweeps: the plan of a multirun (identities, skip-if-done, the dry run's table, FLOPs estimates) and
packing jobs onto devices. Torch-free at import."""
