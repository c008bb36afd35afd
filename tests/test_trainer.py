"""The trainer on a tiny random causal LM: it learns on a fixed batch, runs only the policy forward and
uses the cached log-probs, checkpoints atomically and resumes a killed update exactly, stops on a NaN
loss naming the examples, restores the extragradient anchor exactly, and follows the same loss curve
under torchrun with 2 processes (gloo) as in one process.

The losses' math is tested in tests/test_losses.py; here only the plumbing around them.
Run as a script (``torchrun … tests/test_trainer.py --ddp-worker OUT``) it is the DDP test's worker.
"""

from __future__ import annotations

import math
import shutil
import sys

import pytest
import torch
from torchrun_workers import run_two_workers

from solvers import checkpoint as ckpt
from solvers import algorithms, losses, trainer
from solvers.causal_lm import load_checkpoint, tiny_policy
from solvers.trainer import Example, NonFiniteLossError, TrainerConfig

PROMPTS = ["ab", "hello there", "x", "qq", "a longer prompt here", "zz top", "p", "what now?"]
Y = ["yes", "no way", "maybe so", "ok", "fine", "a much longer answer", "k", "hm"]
Y_OTHER = ["nope", "sure thing", "k", "longer answer here", "no", "b", "ok then", "why"]


def make_examples(policy, n: int = 8) -> list[Example]:
    """Pairs with the reference μ = π_t = the initial policy, its log-probs cached as the store would."""
    logp = policy.score(PROMPTS[:n] + PROMPTS[:n], Y[:n] + Y_OTHER[:n])
    return [
        Example(PROMPTS[i], Y[i], Y_OTHER[i], p_hat=[1.0, 0.8, 0.3, 0.0][i % 4], p_hat_other=0.4, ref_logp=(logp[i], logp[n + i]), prev_logp=(logp[i], logp[n + i]), id=f"c{i}")
        for i in range(n)
    ]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **(tol or {"rtol": 0, "atol": 0}), msg=lambda m, k=k: f"{k}: {m}")


LR = {"nash_mp": 1e-3}  # the others learn the fixed batch at 1e-2; Nash-MP's small targets overshoot there
LOSS_CONFIG = {"sppo": losses.SPPOConfig(eta=10.0)}  # the LM default η = 1e3 asks 500 nats of log-ratio


@pytest.mark.parametrize("name", sorted(n for n, a in algorithms.ALGORITHMS.items() if a.loss is not None))
def test_each_loss_learns_a_fixed_batch(name):
    """Ten full-batch steps lower the loss (Nash-MD's surrogate value means nothing: there, log π(y)
    of the preferred responses must rise instead)."""
    policy = tiny_policy(seed=0)
    examples = make_examples(policy, 4)
    cfg = TrainerConfig(loss=name, loss_config=LOSS_CONFIG.get(name), lr=LR.get(name, 1e-2), micro_batch_size=2, grad_accum=2, max_steps=10, schedule="constant")
    result = trainer.update(policy, examples, cfg)
    curve = [h[f"loss/{name}"] for h in result.history]
    assert len(curve) == 10 and all(math.isfinite(v) for v in curve)
    if name == "nash_md":
        after = policy.score([e.prompt for e in examples], [e.y for e in examples])
        gain = [a - e.ref_logp[0] for a, e in zip(after, examples)]
        assert gain[0] > 0.5 and gain[3] < -0.5, gain  # P̂ = 1: up; P̂ = 0: down
    else:
        assert curve[-1] < 0.7 * curve[0], curve
    assert {"optim/grad_norm", "perf/tokens_per_s", "kl/ref"} <= result.history[-1].keys()
    assert result.summary["perf/tokens_per_s"] > 0


@pytest.mark.parametrize("name", ["inpo", "mnpo"])
def test_only_the_policy_runs_and_the_cached_logprobs_are_used(name):
    """One forward pass per micro-batch (y and y' together), nothing else: the step-0 loss equals the
    loss computed by hand from the policy's own log-probs and *cached* values that no model could give
    (for MNPO also an older iterate's, so its λ-weighted history is really read)."""
    policy = tiny_policy(seed=0)
    examples = make_examples(policy, 4)
    examples = [
        Example(e.prompt, e.y, e.y_other, e.p_hat, ref_logp=(-3.0 * i, -1.0), prev_logp=(-2.0, -0.5 * i), older_logp=((-1.0 * i, 4.0),), id=e.id)
        for i, e in enumerate(examples)
    ]
    logp_y = torch.tensor(policy.score([e.prompt for e in examples], [e.y for e in examples]))
    logp_y_other = torch.tensor(policy.score([e.prompt for e in examples], [e.y_other for e in examples]))
    forwards = []
    policy.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    before = weights(policy.model)

    loss_config = losses.MNPOConfig(weights=(1.0, 3.0)) if name == "mnpo" else None
    cfg = TrainerConfig(loss=name, loss_config=loss_config, lr=1e-3, micro_batch_size=1, grad_accum=4, max_steps=2)
    result = trainer.update(policy, examples, cfg)

    assert len(forwards) == 2 * 4  # steps × micro-batches: no reference or anchor pass
    delta = logp_y - logp_y_other
    delta_ref = torch.tensor([e.ref_logp[0] - e.ref_logp[1] for e in examples])
    delta_prev = torch.tensor([e.prev_logp[0] - e.prev_logp[1] for e in examples])
    p_hat = torch.tensor([e.p_hat for e in examples])
    if name == "inpo":
        by_hand, _ = losses.inpo(delta, delta_ref, delta_prev, p_hat)
    else:
        delta_older = torch.tensor([e.older_logp[0][0] - e.older_logp[0][1] for e in examples])
        by_hand, _ = losses.mnpo(delta, delta_ref, torch.stack([delta_prev, delta_older], 1), p_hat, loss_config)
    torch.testing.assert_close(result.history[0][f"loss/{name}"], by_hand.mean().item(), rtol=1e-5, atol=1e-4)
    # every parameter of the policy got a gradient and moved; AdamW holds state for exactly those
    after = weights(policy.model)
    assert all(not torch.equal(before[k], after[k]) for k, _ in policy.model.named_parameters())
    assert len(result.optimizer_state["state"]) == len(list(policy.model.parameters()))
    assert not policy.model.training  # left in eval mode, as it came


def test_gradient_checkpointing_and_bucketing_change_only_the_cost():
    """Same loss curve and weights (to rounding: without bucketing the micro-batches are cut differently)."""
    results = []
    for options in ({}, {"gradient_checkpointing": True}, {"bucket_window": 0}):
        policy = tiny_policy(seed=0)
        cfg = TrainerConfig(loss="dpo", lr=1e-3, micro_batch_size=2, grad_accum=2, max_steps=2, precision="fp32", **options)  # fp32 on a GPU too
        results.append((trainer.update(policy, make_examples(policy, 4), cfg), weights(policy.model)))
    for result, final in results[1:]:
        assert [h["loss/dpo"] for h in result.history] == pytest.approx([h["loss/dpo"] for h in results[0][0].history], rel=1e-5)
        assert_same_weights(final, results[0][1], rtol=1e-4, atol=1e-5)  # other micro-batches, other padding: rounding


def test_missing_cached_logprobs_are_refused():
    policy = tiny_policy(seed=0)
    e = Example("ab", "yes", "no", 1.0, ref_logp=(-1.0, -2.0), id="c-missing")
    with pytest.raises(ValueError, match=r"prev_logp.*c-missing"):
        trainer.update(policy, [e], TrainerConfig(loss="inpo"))
    with pytest.raises(ValueError, match="kl='sequence'"):
        TrainerConfig(loss="nash_md", loss_config=losses.NashMDConfig(kl="token"))


def test_a_checkpoint_is_whole_or_absent(tmp_path, monkeypatch):
    policy = tiny_policy(seed=0)
    good = ckpt.save_checkpoint(ckpt.step_checkpoint(tmp_path, 2), policy.model, policy.tokenizer, {"step": 2})
    # a write that dies half-way (after the weights, before the tokenizer) leaves no folder under its name
    monkeypatch.setattr(type(policy.tokenizer), "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(ckpt.step_checkpoint(tmp_path, 4), policy.model, policy.tokenizer, {"step": 4})
    assert not ckpt.step_checkpoint(tmp_path, 4).exists()
    # what a killed process leaves behind (a hidden partial folder, an incomplete copy) is never taken
    partial = tmp_path / ".step-00000006.partial-dead"
    partial.mkdir()
    (partial / ckpt.TRAINER_STATE).write_bytes(b"half")
    (tmp_path / "step-00000008").mkdir()
    # a folder with every file but no manifest (data/checkpoints.py: written last) is not complete either
    shutil.copytree(good, ckpt.step_checkpoint(tmp_path, 10))
    assert good.with_suffix(".json").is_file() and not ckpt.is_complete(ckpt.step_checkpoint(tmp_path, 10))
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.load_trainer_state(good) == {"step": 2}


def test_a_killed_update_resumes_to_the_same_weights(tmp_path):
    cfg = TrainerConfig(loss="inpo", lr=1e-3, micro_batch_size=2, max_steps=6, checkpoint_every=2, keep_checkpoints=2, warmup_steps=2)
    uninterrupted = tiny_policy(seed=0)
    examples = make_examples(uninterrupted)
    expected = trainer.update(uninterrupted, examples, cfg, checkpoint_dir=tmp_path / "a")

    def kill_after_step_3(step, metrics):
        if step == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        trainer.update(tiny_policy(seed=0), examples, cfg, checkpoint_dir=tmp_path / "b", on_step=kill_after_step_3)
    assert ckpt.latest_checkpoint(tmp_path / "b") == ckpt.step_checkpoint(tmp_path / "b", 2)

    steps_run = []
    resumed_policy = tiny_policy(seed=0)  # a fresh process: the initial weights again
    resumed = trainer.update(resumed_policy, examples, cfg, checkpoint_dir=tmp_path / "b", on_step=lambda s, m: steps_run.append(s))
    assert steps_run == [3, 4, 5, 6]  # steps 1-2 came from the checkpoint
    assert_same_weights(weights(resumed_policy.model), weights(uninterrupted.model))
    assert [h["loss/inpo"] for h in resumed.history] == [h["loss/inpo"] for h in expected.history]
    # the final checkpoint loads as a policy with its optimizer state
    loaded, opt = load_checkpoint(resumed.checkpoint)
    assert_same_weights(weights(loaded.model), weights(uninterrupted.model))
    assert opt is not None and len(opt["state"]) == len(list(loaded.model.parameters()))
    # another update's checkpoints are refused, not mixed in
    with pytest.raises(ValueError, match="another update"):
        trainer.update(tiny_policy(seed=0), examples[:4], cfg, checkpoint_dir=tmp_path / "b")


def test_a_nan_loss_stops_the_update_and_names_the_batch(tmp_path):
    policy = tiny_policy(seed=0)
    examples = make_examples(policy)
    cfg = TrainerConfig(loss="online_ipo", lr=1e-2, micro_batch_size=2, checkpoint_every=1, bucket_window=0, seed=3)
    plan = trainer.plan_batches([0] * len(examples), cfg.global_batch(), seed=cfg.seed, bucket_window=0)
    bad = plan[2][1]  # in the third step's batch
    examples[bad] = Example(examples[bad].prompt, examples[bad].y, examples[bad].y_other, 0.5, ref_logp=(float("nan"), -1.0), id="c-bad")

    with pytest.raises(NonFiniteLossError) as err:
        trainer.update(policy, examples, cfg, checkpoint_dir=tmp_path)
    assert err.value.example_ids == ["c-bad"] and err.value.indices == [bad] and err.value.step == 3
    assert "c-bad" in str(err.value) and "step 3" in str(err.value)
    last_good = ckpt.step_checkpoint(tmp_path, 2)
    assert err.value.checkpoint == last_good == ckpt.latest_checkpoint(tmp_path)
    # the bad step was not applied: the model still holds step 2's weights, which the checkpoint keeps
    assert_same_weights(weights(policy.model), weights(load_checkpoint(last_good)[0].model))
    assert all(torch.isfinite(v).all() for v in weights(policy.model).values())


def test_extragradient_restores_the_anchor_and_its_optimizer_state(tmp_path):
    """EGPO round: θ_t → midpoint on phase-1 samples, then back to θ_t and AdamW's state at θ_t to step
    with the midpoint's samples. Restoring in memory and reloading the anchor checkpoint both give θ_t
    exactly, and the second phase from either equals a run that never left θ_t."""
    policy = tiny_policy(seed=0)
    examples = make_examples(policy)
    cfg = TrainerConfig(loss="egpo", lr=1e-2, micro_batch_size=4, max_steps=2)
    previous = trainer.update(policy, examples, cfg)  # the last round: AdamW now has moments
    theta_t, opt_t = weights(policy.model), previous.optimizer_state
    anchor = ckpt.snapshot(policy.model, opt_t)
    anchor_dir = ckpt.save_checkpoint(tmp_path / "anchor", policy.model, policy.tokenizer, {"optimizer": opt_t})
    opt_t_copy = ckpt.snapshot(policy.model, opt_t).optimizer_state

    midpoint = trainer.update(policy, examples[:4], cfg, optimizer_state=anchor.optimizer_state)  # phase 1
    assert not torch.equal(weights(policy.model)["lm_head.weight"], theta_t["lm_head.weight"])

    restored_opt = ckpt.restore(policy.model, anchor)
    assert_same_weights(weights(policy.model), theta_t)
    assert_same_state(restored_opt, opt_t_copy)  # phase 1 did not write into the anchor's moments
    assert not states_equal(midpoint.optimizer_state, opt_t_copy)
    reloaded, reloaded_opt = load_checkpoint(anchor_dir)
    assert_same_weights(weights(reloaded.model), theta_t)
    assert_same_state(reloaded_opt, opt_t_copy)

    phase2 = trainer.update(policy, examples[4:], cfg, optimizer_state=restored_opt)
    trainer.update(reloaded, examples[4:], cfg, optimizer_state=reloaded_opt)
    assert_same_weights(weights(policy.model), weights(reloaded.model))
    assert phase2.history[0]["loss/egpo"] != midpoint.history[0]["loss/egpo"]


def states_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a.cpu(), b.cpu())  # a loaded state sits on the CPU until used
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_state(a, b) -> None:
    assert states_equal(a, b)


def test_batches_cover_each_example_once_per_epoch_and_bucketing_cuts_padding():
    lengths = [int(v) for v in torch.randint(1, 200, (96,), generator=torch.Generator().manual_seed(0))]
    for window in (0, 4):
        plan = trainer.plan_batches(lengths, 8, epochs=2, seed=1, bucket_window=window)
        assert len(plan) == 24 and sorted(sum(plan[:12], [])) == list(range(96)) == sorted(sum(plan[12:], []))

    def padding(plan, micro=2):
        return sum(len(rows) * max(lengths[i] for i in rows) - sum(lengths[i] for i in rows) for b in plan for _, rows in trainer.micro_batches(b, micro, 4, 1))

    assert padding(trainer.plan_batches(lengths, 8, bucket_window=4)) < 0.5 * padding(trainer.plan_batches(lengths, 8, bucket_window=0))
    # a short last batch is spread over the slots; a slot with nothing holds row 0 with no positions
    assert trainer.micro_batches([5, 6, 7], 2, 2, 2) == [([0], [5]), ([1], [6]), ([2], [7]), ([], [5])]
    # warm-up 2 then linear decay over 6 steps: 1/2, 1, then 1 − k/4
    cfg = TrainerConfig(warmup_steps=2, schedule="linear")
    assert [trainer.lr_factor(s, cfg, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


def test_two_processes_follow_the_single_process_loss_curve(tmp_path):
    """torchrun --nproc_per_node=2 on the CPU (gloo), micro 2 × accum 1 × 2 processes, against one
    process with micro 2 × accum 2: the same global batch of 4."""
    out = tmp_path / "ddp.pt"
    ddp = run_two_workers(__file__, out)

    policy = tiny_policy(seed=0)
    single = trainer.update(policy, make_examples(policy), ddp_config(grad_accum=2))
    torch.testing.assert_close(torch.tensor(ddp["loss"]), torch.tensor([h["loss/dpo"] for h in single.history]), rtol=1e-5, atol=1e-5)
    # AdamW hides a wrong gradient scale from the weights; the gradient norm shows it
    torch.testing.assert_close(torch.tensor(ddp["grad_norm"]), torch.tensor([h["optim/grad_norm"] for h in single.history]), rtol=1e-5, atol=1e-6)
    assert len(ddp["loss"]) == 4 and ddp["loss"][-1] < ddp["loss"][0]
    assert_same_weights(ddp["weights"], weights(policy.model), rtol=1e-4, atol=1e-5)


def ddp_config(grad_accum: int) -> TrainerConfig:
    return TrainerConfig(loss="dpo", lr=1e-2, micro_batch_size=2, grad_accum=grad_accum, max_steps=4, warmup_steps=1, schedule="cosine")


def _ddp_worker(out: str) -> None:
    torch.set_num_threads(1)
    rank, world = trainer.init_distributed()
    assert world == 2
    policy = tiny_policy(seed=0)
    result = trainer.update((policy.model, policy.tokenizer), make_examples(policy), ddp_config(grad_accum=1))  # (model, tokenizer) works too
    if rank == 0:
        torch.save({"loss": [h["loss/dpo"] for h in result.history], "grad_norm": [h["optim/grad_norm"] for h in result.history], "weights": weights(policy.model)}, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-worker"]:
    _ddp_worker(sys.argv[2])
