# TEMPORARY shim until the runfolder branch is merged
from .store import RunStore, atomic_write, read_summary, STATUSES, STEP_COLUMNS  # noqa
from .identity import DONE, job_lock, job_state, checkpoint_path  # noqa


def write_summary(run_dir, summary):
    RunStore(run_dir).write_summary(summary)
