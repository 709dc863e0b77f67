"""Typed configs of the training core (optimizer, schedule, loop, checkpoints, DPO objective)."""

from __future__ import annotations

import dataclasses

from kt_jax.errors import ConfigError
from kt_jax.model.attention import BACKENDS
from kt_jax.ops.losses import LOSS_TYPES, SFT_REDUCTIONS


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + linear warmup + cosine decay to `end_lr_ratio`·lr (HF Trainer `cosine`), global-norm clipping."""

    learning_rate: float = 5e-5
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0

    def validate(self) -> None:
        """Raise ConfigError naming the bad field."""
        if self.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: steps (optimizer updates), accumulation, evaluation, checkpoints, logging."""

    num_steps: int | None = None  # None: num_epochs passes over the training rows
    num_epochs: float = 3.0
    grad_accum: int = 1
    eval_rows: int = 100  # held-out rows (the original's val_size), whole questions at a time; 0: train on every row
    export_weights: str = "final"  # final: the last step's weights (the original's KC) | best: the best-eval checkpoint
    eval_every_frac: float = 0.1  # evaluate every 10% of the steps (and at the end), keep the best
    eval_batches: int | None = None  # cap on eval batches per evaluation (None: all held-out rows)
    save_every: int | None = None  # None: at every evaluation
    keep_checkpoints: int = 2
    async_checkpoints: bool = True
    log_every: int = 1
    max_in_flight: int = 2  # dispatched steps not yet fetched (jax 0.10.2 CPU-mesh hang: keep small)
    compute_dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: bool = False
    attention: str = "xla"  # xla | splash | cudnn | auto (splash on TPU, cudnn on GPU, xla elsewhere)
    chunk_size: int = 128
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        """Raise ConfigError naming the bad field."""
        if self.grad_accum < 1:
            raise ConfigError(f"train.grad_accum must be >= 1, got {self.grad_accum}")
        if not 0 < self.eval_every_frac <= 1:
            raise ConfigError(f"train.eval_every_frac must be in (0, 1], got {self.eval_every_frac}")
        if self.max_in_flight < 1 or self.max_in_flight > 16:
            raise ConfigError(f"train.max_in_flight must be in [1, 16], got {self.max_in_flight}")
        if self.compute_dtype not in ("float32", "bfloat16") or self.param_dtype not in ("float32", "bfloat16"):
            raise ConfigError("train.compute_dtype / train.param_dtype must be float32 or bfloat16")
        if self.export_weights not in ("final", "best"):
            raise ConfigError(f"train.export_weights: {self.export_weights!r} is not one of ['final', 'best']")
        if self.export_weights == "best" and self.eval_rows <= 0:
            raise ConfigError("train.export_weights: best needs held-out rows (train.eval_rows > 0)")
        if self.eval_rows < 0:
            raise ConfigError(f"train.eval_rows must be >= 0, got {self.eval_rows}")
        if self.attention not in BACKENDS:
            raise ConfigError(f"train.attention must be one of {', '.join(BACKENDS)}, got {self.attention!r}")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The preference objective (KnowTuning: sigmoid, beta 0.1, gamma = sft_weight 0.2, reference = base)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference_free: bool = False
    sft_weight: float = 0.2
    sft_reduction: str = "example"
    reference: str = "base"  # base: the loaded model with LoRA off; initial_policy: the policy as training starts
    reference_dtype: str = "policy"  # policy: the policy's compute dtype (LLaMA-Factory) | float32: a float32 copy

    def validate(self) -> None:
        """Raise ConfigError naming the bad field."""
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"dpo.loss_type: {self.loss_type!r} is not one of {LOSS_TYPES}")
        if self.sft_reduction not in SFT_REDUCTIONS:
            raise ConfigError(f"dpo.sft_reduction: {self.sft_reduction!r} is not one of {SFT_REDUCTIONS}")
        if self.reference not in ("base", "initial_policy"):
            raise ConfigError(f"dpo.reference: {self.reference!r} is not one of ['base', 'initial_policy']")
        if self.reference_dtype not in ("policy", "float32"):
            raise ConfigError(f"dpo.reference_dtype: {self.reference_dtype!r} is not one of ['policy', 'float32']")
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.beta must be > 0 and dpo.label_smoothing in [0, 0.5): {self.beta}, "
                              f"{self.label_smoothing}")
