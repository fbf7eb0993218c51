"""The run's ``summary.json`` as it stands when training starts (:func:`start_summary`).

:func:`resnorm.train.loop.finish` adds the end-of-run fields (status, final and best losses, throughput,
wall time), the callbacks theirs (``checkpoint_step``, ``wandb_run_id``, read-outs), and
:class:`resnorm.train.callbacks.RunStoreWriter` writes it. The keys are documented in docs/run-folder.md.
"""

from __future__ import annotations

import time
from typing import Any, Dict

import torch


def start_summary(run) -> Dict[str, Any]:
    """Identity, provenance and set-up of the run, and the end-of-run fields still empty."""
    from omegaconf import OmegaConf

    from resnorm.runs.identity import run_id
    from resnorm.runs.provenance import git_commit
    from resnorm.runs.folder import read_summary

    cfg, job = run.cfg, run.job
    rid = job.run_id or run_id(cfg)
    prior = (read_summary(job.run_dir) if run.is_main else None) or {}
    attempts = prior.get("attempts", 0) if prior.get("run_id") == rid else 0
    return dict(
        status="running", diverged_step=None, diverge_reason=None, error=None,
        initial_loss=None, final_train_loss=None, final_val_loss=None, best_val_loss=None,
        tokens_per_s=None, wall_s=None, steps_done=0, n_params=run.model.n_params(),
        variant=cfg.model.norm, depth=int(cfg.depth), seed=int(cfg.seed), data_source=run.data.source,
        device=str(run.device), torch_version=torch.__version__, git_commit=git_commit(),
        run_name=job.run_name, group=job.group, overrides=job.overrides,
        config=OmegaConf.to_container(cfg, resolve=True), run_id=rid, attempts=attempts + 1,
        resumed_from_step=None, checkpoint_step=None, threads=run.threads, world_size=run.world,
        device_slots=[s.name for s in run.slots] if run.slots else None,
        started_at=time.time(), finished_at=None, outcome=None, diverge_kind=None,
        unigram_loss=run.data.unigram_loss, entropy_rate=run.data.entropy_rate,
        stall_margin=float(cfg.train.stall_margin), spike_count=0, spike_steps=[], skipped_steps=[],
        **data_fields(run.data),
    )


def data_fields(data) -> Dict[str, Any]:
    """The tokenizer the run trained with and what bits per byte are computed from."""
    return dict(tokenizer=data.tokenizer_name, data_vocab_size=int(data.vocab_size),
                val_tokens_per_byte=data.val_tokens_per_byte, final_val_bpb=None, best_val_bpb=None)
