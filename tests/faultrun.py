"""``python tests/faultrun.py ARGS``: ``python run.py ARGS`` with a fault injected (tests/test_faults.py).

``RESNORM_FAULT`` chooses the fault, ``KIND:N`` (N counts from 1 over the whole process, so over the
jobs of a sweep run by the basic launcher):

- ``kill_after_checkpoint:N``: SIGKILL right after the N-th checkpoint is in place;
- ``kill_in_checkpoint:N``: SIGKILL in the middle of the N-th checkpoint write (the temporary file
  written, not yet renamed);
- ``kill_in_summary:N``: SIGKILL in the middle of the N-th write of a final summary (completed);
- ``raise_in_checkpoint:N``: the N-th checkpoint write raises (the run fails).
"""

import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _install(kind: str, n: int) -> None:
    from resnorm.train import checkpoint
    from resnorm.runs import folder as runfolder

    count = {"n": 0}

    def due() -> bool:
        count["n"] += 1
        return count["n"] == n

    def kill() -> None:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    if kind in ("kill_after_checkpoint", "raise_in_checkpoint", "kill_in_checkpoint"):
        real_write = checkpoint.atomic_write

        def atomic_write(path, write):
            if not due():
                return real_write(path, write)
            if kind == "raise_in_checkpoint":
                raise OSError(28, "No space left on device (injected)")
            if kind == "kill_in_checkpoint":
                tmp = Path(path).with_name(".checkpoint.injected.tmp.pt")
                write(tmp)
                kill()
            real_write(path, write)
            kill()

        checkpoint.atomic_write = atomic_write
    elif kind == "kill_in_summary":
        real_text = runfolder.write_text

        def write_text(path, text):
            if Path(path).name == runfolder.SUMMARY and '"status": "completed"' in text and due():
                Path(path).with_name(".summary.injected.tmp.json").write_text(text[: len(text) // 2])
                kill()
            return real_text(path, text)

        runfolder.write_text = write_text
    else:
        raise SystemExit(f"unknown RESNORM_FAULT kind {kind!r}")


if __name__ == "__main__":
    fault = os.environ.get("RESNORM_FAULT")
    if fault:
        kind, _, n = fault.partition(":")
        _install(kind, int(n or 1))
    sys.argv = [str(ROOT / "run.py"), *sys.argv[1:]]
    runpy.run_path(str(ROOT / "run.py"), run_name="__main__")
