"""The campaign config: one typed model, each field documented, validated on load.

Kinds of policy and oracle are discriminated unions on ``kind``, so a config names what it uses and a
mistyped field is refused with its path (``solver.beta: Input should be greater than 0``).
"""

from __future__ import annotations

import os
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ALGORITHMS = Literal["nash_mp", "egpo", "inpo", "mnpo", "nash_md", "onpo", "sppo"]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GameSpec(Strict):
    """One prompt of the tabular world: a finite game over responses y0 … y{n−1}."""

    kind: Literal["cyclic", "random", "file"] = Field(description="generator, or 'file' for a .npy matrix")
    n: int = Field(5, ge=2, le=10_000, description="number of responses (ignored for 'file')")
    seed: int = Field(0, description="seed of the random game")
    strength: float = Field(1.0, ge=0.5, le=1.0, description="cyclic game: P(i beats the next ones)")
    path: str | None = Field(None, description="'file': path of a .npy preference matrix")

    @model_validator(mode="after")
    def _path_for_file(self):
        if self.kind == "file" and not self.path:
            raise ValueError("kind 'file' needs a path to a .npy matrix")
        return self


class TabularPolicyConfig(Strict):
    """A softmax over each prompt's finite response set, updated by the solver's stochastic step."""

    kind: Literal["tabular"] = "tabular"
    reference_spread: float = Field(
        1.0, ge=0.0, description="log μ ~ N(0, spread²) per response (0 = uniform μ); a uniform μ makes cyclic games trivial"
    )
    seed: int = Field(0, description="seed of the reference policy")


class MatrixOracleConfig(Strict):
    """The ground-truth oracle of the tabular world."""

    kind: Literal["matrix"] = "matrix"
    mode: Literal["exact", "bernoulli"] = Field("bernoulli", description="exact P(a ≻ b), or one sampled vote per pair")
    seed: int = 0


PolicyConfig = Annotated[TabularPolicyConfig, Field(discriminator="kind")]
OracleConfig = Annotated[MatrixOracleConfig, Field(discriminator="kind")]


class SolverConfig(Strict):
    """The Nash solver and its regularization. See docs/solvers.md for each algorithm."""

    algorithm: ALGORITHMS = "nash_mp"
    beta: float = Field(0.25, gt=0, description="KL regularization toward the reference μ; larger = faster, more conservative")
    eta: float | None = Field(None, gt=0, description="step size; None = the algorithm's default")
    history: int = Field(2, ge=1, description="MNPO: number of past iterates H")
    weights: list[float] | None = Field(None, description="MNPO: weights λ of the past iterates (normalized)")
    schedule: Literal["constant", "decay"] = Field("constant", description="Nash-MD step schedule")


class SamplingConfig(Strict):
    samples_per_prompt: int = Field(8, ge=2, description="k responses per prompt and phase; pairs grow as k²")


class PairingConfig(Strict):
    strategy: Literal["all_pairs", "both_orders"] = Field(
        "all_pairs", description="all_pairs: each unordered pair once, in a random order; both_orders: each pair in both orders"
    )
    skip_identical: bool = Field(True, description="don't ask about a pair of identical texts (P = ½ by definition)")


class CampaignConfig(Strict):
    """A campaign: ``rounds`` rounds of sample → pair → judge → update → evaluate on one store."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$", description="lowercase letters, digits and dashes; names runs and artifacts")
    store: str = Field(description="folder or pyarrow.fs URI (s3://…) of the Parquet store; relative to the working directory")
    rounds: int = Field(ge=1, le=10_000)
    seed: int = 0
    games: list[GameSpec] = Field(min_length=1, description="the tabular world: one prompt per game")
    policy: PolicyConfig = TabularPolicyConfig()
    oracle: OracleConfig = MatrixOracleConfig()
    solver: SolverConfig = SolverConfig()
    sampling: SamplingConfig = SamplingConfig()
    pairing: PairingConfig = PairingConfig()


def load_config(path: str, **overrides) -> CampaignConfig:
    """Read and validate a YAML campaign config; ``overrides`` replace top-level fields."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a campaign config is a mapping of fields, got {type(raw).__name__}")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return parse_config(raw, source=path)


def parse_config(raw: dict, *, source: str = "config") -> CampaignConfig:
    try:
        return CampaignConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{source}: {'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def default_config_path() -> str:
    return os.path.join(os.path.dirname(__file__), "demo.yaml")
