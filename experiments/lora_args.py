"""`LoraArgs`: ModelLink's `--lora-*` flags as a frozen value, and how they meet adapters read from a file.

As in ModelLink, LoRA is on when `--lora-target-modules` names modules; `--lora-r` and `--lora-alpha`
default to 16 and 32. Training builds its adapters from these flags, and a resume (`--lora-load`)
must find the same ones in the checkpoint. Inference reads r, alpha and targets from the adapters
themselves; each flag given must then agree with them. Kept free of absl flag definitions (like
`experiments.architecture`), so `experiments.training` can use it.
"""

from __future__ import annotations

import dataclasses

from mistral_fn import lora
from mistral_fn.errors import ConfigError

DEFAULT_R, DEFAULT_ALPHA = 16, 32  # ModelLink's --lora-r / --lora-alpha defaults


@dataclasses.dataclass(frozen=True)
class LoraArgs:
    """`--lora_target_modules` (empty: LoRA off), `--lora_r`, `--lora_alpha` (None: not given) and
    `--lora_load` (adapters to resume or apply)."""

    target_modules: tuple[str, ...] = ()
    r: int | None = None
    alpha: float | None = None
    load: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.target_modules:
            lora.check_targets(self.target_modules)
        if self.r is not None and (not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1):
            raise ConfigError(f"--lora_r={self.r!r} must be a positive integer")
        if self.alpha is not None and not self.alpha > 0:
            raise ConfigError(f"--lora_alpha={self.alpha!r} must be positive")

    @property
    def enabled(self) -> bool:
        return bool(self.target_modules)

    @property
    def rank(self) -> int:
        return DEFAULT_R if self.r is None else self.r

    @property
    def scale_alpha(self) -> float:
        return DEFAULT_ALPHA if self.alpha is None else self.alpha

    def settings(self) -> dict:
        """The adapters' settings as a training run records them in its checkpoints' metadata."""
        return {"r": self.rank, "alpha": self.scale_alpha, "targets": list(self.target_modules)}

    def check_resume(self, saved: object, source: str) -> None:
        """Raise unless `saved` (the settings a checkpoint records; None: none) are this run's: the same r,
        alpha and target modules, by name (a fused `query_key_value` adapter is not three `q/k/v_proj` ones)."""
        if not isinstance(saved, dict):
            raise ConfigError(f"--lora_load={source}: not the native checkpoint of a LoRA run, which pretrain "
                              "resumes (a full model goes to --load)")
        ours = self.settings()
        for key, flag in (("r", "lora_r"), ("alpha", "lora_alpha"), ("targets", "lora_target_modules")):
            mine, theirs = ours[key], saved.get(key)
            if key == "targets":
                mine, theirs = sorted(mine), sorted(theirs or [])
            if mine != theirs:
                raise ConfigError(f"--{flag}={_show(ours[key])} does not match {source}, which was trained with "
                                  f"{key}={_show(saved.get(key))}")

    def check_adapters(self, tree: lora.LoraTree, source: str) -> None:
        """Raise unless every flag given agrees with the adapters `tree` read from `source`; target modules
        agree when they adapt the same weights (ModelLink's `query_key_value` = PEFT's q/k/v_proj)."""
        if self.r is not None and self.r != tree.rank:
            raise ConfigError(f"--lora_r={self.r} does not match {source}, which has r={tree.rank}")
        if self.alpha is not None and self.alpha != tree.alpha:
            raise ConfigError(f"--lora_alpha={self.alpha:g} does not match {source}, which has alpha={tree.alpha:g}")
        if self.target_modules and _weights(self.target_modules) != _weights(tree.targets):
            raise ConfigError(f"--lora_target_modules={_show(list(self.target_modules))} does not match {source}, "
                              f"which adapts {_show(tree.targets)}")


def _weights(targets) -> set[tuple[str, str]]:
    """The `(group, leaf)` weights a list of target modules adapts."""
    return {(lora.TARGETS[t][0], leaf) for t in targets for leaf in lora.TARGETS[t][1]}


def _show(value) -> str:
    return ",".join(value) if isinstance(value, list) else f"{value:g}" if isinstance(value, float) else str(value)
