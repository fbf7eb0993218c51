"""Config schemas (structured configs for Hydra) and the one place configs are validated.

The dataclasses give every key a type, so Hydra rejects a typo'd key or a wrong type when it composes
the config. :func:`validate` then checks values and combinations once, at the edge, before any
training, and raises :class:`resnorm.errors.ConfigError` with one line naming the key, the bad value
and what is allowed. This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ConfigError
from .variants import ADMIN_MODES, NORM_LAYERS
INIT_SCHEMES = ("xavier", "gpt2")
ACTIVATIONS = ("gelu", "relu")
SCHEDULES = ("cosine", "constant")
DATASETS = ("shakespeare", "text", "synthetic")
LOGGER_MODES = ("offline", "online", "disabled")
PRECISIONS = ("fp32", "bf16")


@dataclass
class ModelConfig:
    norm: str = "pre"  # the variant, see resnorm.variants.VARIANTS
    d_model: int = 64
    n_heads: int = 2
    d_ff: Optional[int] = None  # None: 4 * d_model
    vocab_size: int = 256  # byte-level tokens
    norm_layer: Optional[str] = None  # None: the variant's own norm layer
    norm_eps: float = 1e-5
    activation: str = "gelu"
    bias: bool = True
    tie_weights: bool = False
    init: str = "xavier"  # xavier: the papers' init; gpt2: N(0, 0.02) with 1/sqrt(2L) projections
    # Variant parameters (resnorm.variants.VariantOptions; each used only by its variant or norm layer)
    mixln_fraction: float = 0.25  # mixln: the first floor(fraction * depth) layers are Post-LN
    dyt_alpha0: float = 0.5  # DyT norm layer: initial alpha
    resi_dual_scale: float = 1.0  # resi_dual: scale of the dual stream, in (0, 1]
    admin_mode: str = "profile"  # admin: profile (omega from one batch) | closed_form (omega_i = sqrt(i))
    depth_scale_a: float = 1.0  # depth_scaled: branch multiplier a / sqrt(depth)
    b2t_rescale_init: bool = False  # b2t: every block weight x depth^-1/2 at init (the official code)
    qk_norm: bool = False  # LayerNorm of queries and keys over the head dim (Wortsman et al. 2023)
    z_loss: float = 0.0  # c * mean(logsumexp(logits)^2) added to the loss (1e-4 in Wortsman et al.); 0 = off


@dataclass
class DataConfig:
    name: str = "shakespeare"
    path: Optional[str] = None  # required for data=text
    val_fraction: float = 0.1
    synthetic_tokens: int = 200_000  # length of the synthetic stream
    synthetic_vocab: int = 64  # symbols the synthetic stream uses (< model.vocab_size)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    warmup_steps: int = 20
    schedule: str = "cosine"  # after warmup: cosine decay to min_lr_ratio * lr, or constant
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    weight_decay_coupling: str = "lr"  # TEMP until the config branch lands
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-8
    grad_clip: Optional[float] = None  # off by default: clipping hides the instability under study


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 64
    eval_every: int = 50
    eval_batches: int = 4
    log_every: int = 1  # per-layer statistics and W&B logging interval, in steps
    diverge_factor: Optional[float] = 2.0  # diverged when the loss exceeds this multiple of the initial loss
    probes: bool = True
    probe_every: int = 50  # activation RMS, branch ratio, update ratio, max attention logit per sublayer; 0 = off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16 (autocast, GPU)
    threads: Optional[int] = None  # torch threads; None: all cores (1 per job under hydra/launcher=local)
    compile: bool = False
    progress: bool = True
    devices: int = 1  # data-parallel processes (DDP), one per device; batch_size is the global batch
    checkpoint_every: int = 50  # steps between checkpoints (0: none); an interrupted run resumes from it
    keep_checkpoint: bool = False  # keep checkpoint.pt (the final state) once the run is over


@dataclass
class LoggerConfig:
    wandb: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "resnorm"
    entity: Optional[str] = None


@dataclass
class Config:
    depth: int = 6
    seed: int = 0
    name: str = "main"  # the sweep's name: multirun/<name>/ and results/<name>/
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)


def register_schemas() -> None:
    """Put the schemas in Hydra's ConfigStore (``conf/config.yaml`` lists ``resnorm_schema`` first)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="resnorm_schema", node=Config)


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(key, value, f"choose one of {', '.join(map(str, choices))}")


def _positive(key: str, value: Any, integer: bool = True) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) if integer else isinstance(value, (int, float))
    if not ok or value <= 0:
        raise ConfigError(key, value, f"must be a positive {'integer' if integer else 'number'}")


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def _get_or(cfg: Any, dotted: str, default: Any) -> Any:
    try:
        return _get(cfg, dotted)
    except (KeyError, AttributeError):
        return default


def validate(cfg: Any) -> None:
    """Check a composed config (DictConfig, dataclass or nested dict); raise ConfigError on the first problem."""
    from .variants import VARIANTS

    g = lambda k: _get(cfg, k)  # noqa: E731

    _positive("depth", g("depth"))
    if not isinstance(g("seed"), int) or g("seed") < 0:
        raise ConfigError("seed", g("seed"), "must be a non-negative integer")
    name = g("name")
    if not name or "/" in str(name) or str(name).startswith("."):
        raise ConfigError("name", name, "must be a non-empty folder name without '/'")

    _choice("model.norm", g("model.norm"), tuple(VARIANTS))
    for key in ("model.d_model", "model.n_heads", "model.vocab_size"):
        _positive(key, g(key))
    if g("model.d_model") % g("model.n_heads"):
        raise ConfigError("model.n_heads", g("model.n_heads"),
                          f"must divide model.d_model={g('model.d_model')}")
    if g("model.d_ff") is not None:
        _positive("model.d_ff", g("model.d_ff"))
    if g("model.norm_layer") is not None:
        _choice("model.norm_layer", g("model.norm_layer"), NORM_LAYERS)
        variant = VARIANTS[g("model.norm")]
        if not variant.has_norm:
            # the override swaps the norm layer in the variant's norm slots; this variant has none
            raise ConfigError("model.norm_layer", g("model.norm_layer"),
                              f"model.norm={variant.name} has no norm to replace; leave model.norm_layer "
                              f"unset (null), or pick a variant with norms")
    # variant parameters (a config written before they existed lacks them: their defaults apply)
    opt = lambda k: _get_or(cfg, f"model.{k}", getattr(ModelConfig, k))  # noqa: E731
    if not 0.0 <= opt("mixln_fraction") <= 1.0:
        raise ConfigError("model.mixln_fraction", opt("mixln_fraction"), "must lie in [0, 1]")
    _positive("model.dyt_alpha0", opt("dyt_alpha0"), integer=False)
    if not 0.0 < opt("resi_dual_scale") <= 1.0:
        raise ConfigError("model.resi_dual_scale", opt("resi_dual_scale"), "must lie in (0, 1]")
    _choice("model.admin_mode", opt("admin_mode"), ADMIN_MODES)
    _positive("model.depth_scale_a", opt("depth_scale_a"), integer=False)
    _positive("model.norm_eps", g("model.norm_eps"), integer=False)
    _choice("model.activation", g("model.activation"), ACTIVATIONS)
    _choice("model.init", g("model.init"), INIT_SCHEMES)
    if not isinstance(g("model.qk_norm"), bool):
        raise ConfigError("model.qk_norm", g("model.qk_norm"), "must be true or false")
    z = g("model.z_loss")
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z >= 0 or z != z or z == float("inf"):
        raise ConfigError("model.z_loss", z, "must be a finite number >= 0 (0 turns it off)")

    _choice("data", g("data.name"), DATASETS)
    if not 0.0 < g("data.val_fraction") < 1.0:
        raise ConfigError("data.val_fraction", g("data.val_fraction"), "must lie strictly between 0 and 1")
    if g("data.name") == "text":
        path = g("data.path")
        if not path:
            raise ConfigError("data.path", path, "data=text needs data.path=FILE (a UTF-8 or byte text file)")
        if not Path(path).expanduser().is_file():
            raise ConfigError("data.path", path, "no such file")
        if Path(path).expanduser().stat().st_size == 0:
            raise ConfigError("data.path", path, "the file is empty")
    if g("data.name") == "synthetic":
        _positive("data.synthetic_tokens", g("data.synthetic_tokens"))
        voc = g("data.synthetic_vocab")
        if not isinstance(voc, int) or not 2 <= voc <= g("model.vocab_size"):
            raise ConfigError("data.synthetic_vocab", voc, f"must lie in [2, model.vocab_size={g('model.vocab_size')}]")

    _positive("optim.lr", g("optim.lr"), integer=False)
    if not isinstance(g("optim.warmup_steps"), int) or g("optim.warmup_steps") < 0:
        raise ConfigError("optim.warmup_steps", g("optim.warmup_steps"), "must be a non-negative integer")
    _choice("optim.schedule", g("optim.schedule"), SCHEDULES)
    if not 0.0 <= g("optim.min_lr_ratio") <= 1.0:
        raise ConfigError("optim.min_lr_ratio", g("optim.min_lr_ratio"), "must lie in [0, 1]")
    if g("optim.weight_decay") < 0:
        raise ConfigError("optim.weight_decay", g("optim.weight_decay"), "must be >= 0")
    for key in ("optim.beta1", "optim.beta2"):
        if not 0.0 <= g(key) < 1.0:
            raise ConfigError(key, g(key), "must lie in [0, 1)")
    _positive("optim.eps", g("optim.eps"), integer=False)
    if g("optim.grad_clip") is not None:
        _positive("optim.grad_clip", g("optim.grad_clip"), integer=False)

    for key in ("train.steps", "train.batch_size", "train.seq_len", "train.eval_every",
                "train.eval_batches", "train.log_every"):
        _positive(key, g(key))
    if g("train.diverge_factor") is not None and not g("train.diverge_factor") > 1.0:
        raise ConfigError("train.diverge_factor", g("train.diverge_factor"), "must be > 1")
    device = g("train.device")
    if device not in ("auto", "cpu", "cuda") and not (str(device).startswith("cuda:") and str(device)[5:].isdigit()):
        raise ConfigError("train.device", device, "choose auto, cpu, cuda or cuda:N")
    _choice("train.precision", g("train.precision"), PRECISIONS)
    pe = g("train.probe_every")
    if isinstance(pe, bool) or not isinstance(pe, int) or pe < 0:
        raise ConfigError("train.probe_every", pe, "must be a non-negative integer (0 turns the probes off)")
    if g("train.threads") is not None:
        _positive("train.threads", g("train.threads"))
    _positive("train.devices", g("train.devices"))
    if g("train.batch_size") % g("train.devices"):
        raise ConfigError("train.devices", g("train.devices"),
                          f"must divide train.batch_size={g('train.batch_size')} (the global batch)")
    if not isinstance(g("train.checkpoint_every"), int) or g("train.checkpoint_every") < 0:
        raise ConfigError("train.checkpoint_every", g("train.checkpoint_every"),
                          "must be a non-negative integer (0: no checkpoints)")

    _choice("logger.mode", g("logger.mode"), LOGGER_MODES)


def compose(overrides=(), *, validate: bool = False):  # TEMP until the config branch lands
    from hydra import compose as hydra_compose, initialize_config_dir

    register_schemas()
    conf = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    if validate:
        globals()["validate"](cfg)
    return cfg
