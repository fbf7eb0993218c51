"""Training: the loop (fit), its callbacks, checkpoint and resume, the divergence guard, spikes, precision,
optimizers and a variant's optimizer rules, objectives, stacked runs, devices, a job's preflight check and
Hydra's task function."""
