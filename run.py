"""resnorm's entry point: ``python run.py [-m] key=value ... [--dry-run]`` (Hydra; see README)."""

import sys

import hydra

from resnorm.cli import expand_flags, exit_code, report_config_errors
from resnorm.config import register_schemas

register_schemas()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    from resnorm.train import run_job

    with report_config_errors():
        return run_job(cfg)


if __name__ == "__main__":
    sys.argv = expand_flags(sys.argv)
    main()
    sys.exit(exit_code())
