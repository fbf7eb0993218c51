"""resnorm's entry point: ``python run.py [-m] key=value ... [--dry-run]`` (Hydra; see README.md and docs/configuration.md)."""

import os
import sys

# OpenMP threads sleep instead of spinning when idle: with 2 cores shared by jobs, spinning made
# steps up to 10x slower (benchmarks/README.md). Set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402

from resnorm.cli import expand_flags, exit_code, preflight, record_single, report_config_errors
from resnorm.config.schema import register_schemas

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    from resnorm.train.task import run_job

    with report_config_errors():
        return record_single(run_job(cfg))


if __name__ == "__main__":
    sys.argv = expand_flags(sys.argv)
    preflight(sys.argv)  # a bad config stops here, before Hydra writes anything
    main()
    sys.exit(exit_code())
