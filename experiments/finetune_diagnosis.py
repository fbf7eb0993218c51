"""Why fine-tuning learned nothing: one pre-trained run fine-tuned under one setting at a time.

``python -m experiments.finetune_diagnosis RUN_DIR TASK [name=value ...]`` fine-tunes the run's
checkpoint on TASK (a built-in name or a task file) with :mod:`resnorm.tasks.recipe`'s trainer at one
learning rate (``lr=``, ``steps=``, ``at=first|last`` the tagged token, ``head=`` the head's LR multiple, ``warmup=``, ``pool=mean|last``,
``init=pretrained|random``), early-stopped on the validation split carved from the training rows,
and prints one line: the best validation score and step, the held-out score of those weights, the
training loss at the end, the wall time. The numbers of docs/finetune.md ("Why it learned nothing")
come from this script (one torch thread).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def parse(argv):
    opts = dict(at="", floors=0, lr=3e-4, steps=200, head=1.0, warmup=20, pool="", init="pretrained", eval_every=25,
                patience=1000, seed=0)
    for arg in argv:
        k, v = arg.split("=", 1)
        opts[k] = type(opts[k])(v) if not isinstance(opts[k], str) else v
    return opts


def main(argv=None) -> int:
    import torch

    from resnorm.tasks import recipe as R
    from resnorm.finetune import task_setup

    argv = sys.argv[1:] if argv is None else argv
    run_dir, task, opts = Path(argv[0]), argv[1], parse(argv[2:])
    torch.set_num_threads(1)
    t0 = time.time()
    if opts["at"]:  # where a tag is learned: a word's first or last token, whatever the model
        from resnorm.tasks import labelled as tasks

        tasks.TAG_AT = {True: opts["at"], False: opts["at"]}
    setup = task_setup(run_dir, task, opts["seed"])
    model = setup.model
    if opts["floors"]:
        from resnorm.tasks.heads import floors

        print(f"{run_dir.name} {task} floors: {floors(model, setup.data, setup.cfg.train.seq_len)} "
              f"{time.time() - t0:.0f}s", flush=True)
        return 0
    if opts["pool"]:
        model.pooling = opts["pool"]
    if opts["init"] == "random":
        model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        model.reset_head()
    recipe = R.Recipe(lrs=(opts["lr"],), steps=opts["steps"], head_lr_scale=opts["head"], warmup=opts["warmup"],
                      eval_every=opts["eval_every"], patience=opts["patience"], seed=opts["seed"])
    best, _ = R.select(model, setup.data, setup.fit, setup.val, recipe)
    preds, _, gold = R.predict(model, *setup.data.val, row_of=(setup.data.row_of or {}).get("held"))
    held = R.task_metric(setup.data.kind, setup.data.labels, preds, gold)
    print(f"{run_dir.name} {task} {' '.join(f'{k}={v}' for k, v in opts.items())}: val {best.best_score:.3f} "
          f"@{best.best_step} held-out {held:.3f} (history {[(s, round(v, 3)) for s, v, _ in best.history]}) "
          f"{time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
