"""Learned preference models on a tiny byte-level Llama built from a config (offline, CPU).

The world: three annotator groups, each preferring more of one letter (a, b, c) in the response
(``TextWorldOracle`` with three "fondness" groups). Responses are short strings mostly of one letter
with some of the next (a with b, b with c, c with a), so the population's majority goes round:
"bbbbcc" ≻ "aaaabb" ≻ "ccccaa" ≻ "bbbbcc", each with P = ⅔. No scalar reward can represent that; a
pairwise model can, and a tiny one learns it in a few seconds. The other helpers here (the world, the
store) are shared with tests/test_cascade.py.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys

import pytest
import torch
from preference_fixtures import FAST, SMALL, as_examples, world_pairs
from store_contents import store_pairs
from torchrun_workers import run_two_workers

from data.store import Store
from oracles.learned import LearnedOracle
from oracles.text_world import letter_world
from solvers import preference_model as pm
from solvers.trainer import NonFiniteLossError

CYCLE = ("aaaabb", "bbbbcc", "ccccaa")  # X, Y, Z: Y ≻ X, Z ≻ Y, X ≻ Z, each with P = ⅔


def probs(model, triples: list[tuple[str, str]], prompt: str = "Write about tea.") -> list[float]:
    return model.predict([prompt] * len(triples), [a for a, _ in triples], [b for _, b in triples])


# ----- antisymmetry -------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", pm.HEADS)
def test_antisymmetry_is_exact_for_random_inputs(head):
    model = pm.tiny_preference_model(pm.PreferenceModelConfig(head=head, head_hidden=32, max_prompt_tokens=32, max_response_tokens=32), seed=3)
    rng = random.Random(7)
    word = lambda: "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(160, 1000)])) for _ in range(rng.randint(0, 40)))  # noqa: E731
    prompts = [word() for _ in range(24)]
    a, b = [word() for _ in prompts], [word() for _ in prompts]
    forward = model.predict(prompts + prompts, a + b, b + a, batch_size=5)
    n = len(prompts)
    assert all(forward[i] + forward[n + i] == 1.0 for i in range(n))  # exactly, in floating point
    assert len({round(p, 6) for p in forward}) > n  # not a constant: the check is not vacuous
    # the two orders asked in separate calls: still exactly complementary (the same batch is encoded)
    assert all(model.predict([prompts[i]], [a[i]], [b[i]])[0] + model.predict([prompts[i]], [b[i]], [a[i]])[0] == 1.0 for i in range(4))
    # other batch compositions change only rounding
    assert model.predict(prompts[:4], b[:4], a[:4]) == pytest.approx(forward[n : n + 4], abs=1e-6)
    assert model.predict(prompts[:3], a[:3], a[:3]) == [0.5, 0.5, 0.5]
    # the training forward pass (tensors, gradients on) is antisymmetric too
    enc = model.encode(prompts + prompts, a + b)
    ab = model(**model.collate(enc[:n] + enc[n:]))
    ba = model(**model.collate(enc[n:] + enc[:n]))
    torch.testing.assert_close(ab, -ba, rtol=0, atol=1e-6)


# ----- learning an intransitive preference --------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    """A BT and a pairwise model trained the same way on the letter world's train prompts."""
    world = letter_world()
    train_set = as_examples(world, world_pairs("train", seed=0))
    models = {}
    for head in ("bt", "pairwise"):
        models[head] = pm.tiny_preference_model(pm.PreferenceModelConfig(**{**SMALL.__dict__, "head": head}), seed=0)
        pm.train(models[head], train_set, FAST)
    return world, models


def test_pairwise_beats_bradley_terry_and_reproduces_the_cycle(trained):
    world, models = trained
    held_out = as_examples(world, world_pairs("eval", seed=1))  # other prompts, other strings
    bt, pw = (pm.evaluate(models[h], held_out) for h in ("bt", "pairwise"))
    # BT can do no better than ½ on the cycle's pairs: ln 2 − H(⅔) ≈ 0.057 nats lost on each
    assert pw["logloss"] < bt["logloss"] - 0.02, (bt, pw)
    assert pw["logloss"] < pw["logloss_floor"] + 0.015 and pw["accuracy"] > 0.9 and pw["ece"] < 0.05, pw
    X, Y, Z = CYCLE
    edges = [(Y, X), (Z, Y), (X, Z)]  # the truth: each ⅔
    assert [world.prob(a, b) for a, b in edges] == [2 / 3] * 3
    assert all(p > 0.58 for p in probs(models["pairwise"], edges)), probs(models["pairwise"], edges)
    # BT orders X, Y, Z by a scalar: at least one edge of any cycle falls on the wrong side
    assert not all(p > 0.5 for p in probs(models["bt"], edges))


def test_compare_bt_pairwise_reports_the_gap():
    world = letter_world()
    examples = as_examples(world, world_pairs("train", seed=0, prompts=6))
    out = pm.compare_bt_pairwise(examples, backbone=lambda cfg: pm.tiny_preference_model(cfg, seed=0), model_config=SMALL, train_config=pm.PreferenceTrainConfig(max_steps=2, eval_share=0.3))
    assert set(out) == {"intransitivity/logloss_bt", "intransitivity/logloss_pairwise", "intransitivity/logloss_gap", "intransitivity/eval_pairs"}
    assert out["intransitivity/logloss_gap"] == pytest.approx(out["intransitivity/logloss_bt"] - out["intransitivity/logloss_pairwise"])
    assert out["intransitivity/eval_pairs"] == 30  # 2 of 6 prompts held out, 15 pairs each


# ----- checkpoints ---------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_fingerprint(trained, tmp_path):
    _, models = trained
    model = models["pairwise"]
    edges = [(CYCLE[1], CYCLE[0]), (CYCLE[0], CYCLE[2])]
    path = pm.save_preference_model(model, tmp_path / "m1")
    loaded = pm.load_preference_model(path, SMALL)
    assert loaded.fingerprint == model.fingerprint == pm.checkpoint_fingerprint(path)
    assert probs(loaded, edges) == probs(model, edges)
    shutil.copytree(path, tmp_path / "copy")
    assert pm.load_preference_model(tmp_path / "copy").fingerprint == model.fingerprint  # same files, same hash
    oracle = LearnedOracle(loaded)
    assert oracle.oracle_id.startswith(f"learned:pairwise@{model.fingerprint[:12]}:")
    with pytest.raises(FileExistsError):
        pm.save_preference_model(loaded, path)
    # trained further: no longer the saved weights, so no fingerprint until saved again
    pm.train(loaded, as_examples(letter_world(), world_pairs("train", prompts=1)), pm.PreferenceTrainConfig(max_steps=1, lr=1e-2, eval_share=0))
    assert loaded.fingerprint is None
    with pytest.raises(ValueError, match="no fingerprint"):
        LearnedOracle(loaded)
    pm.save_preference_model(loaded, tmp_path / "m3")
    assert loaded.fingerprint != model.fingerprint and LearnedOracle(loaded).oracle_id != oracle.oracle_id


def test_a_killed_run_resumes_to_the_same_weights(tmp_path):
    examples = as_examples(letter_world(), world_pairs("train", prompts=2))
    config = pm.PreferenceTrainConfig(lr=3e-3, micro_batch_size=4, grad_accum=2, max_steps=5, checkpoint_every=2, eval_share=0)
    straight = pm.tiny_preference_model(SMALL, seed=1)
    pm.train(straight, examples, config)

    def kill(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    resumed = pm.tiny_preference_model(SMALL, seed=1)
    with pytest.raises(KeyboardInterrupt):
        pm.train(resumed, examples, config, checkpoint_dir=tmp_path / "steps", on_step=kill)
    # a new process, another initialization: only the checkpoint at step 2 can make it end like `straight`
    fresh = pm.tiny_preference_model(SMALL, seed=7)
    steps_run = []
    result = pm.train(fresh, examples, config, checkpoint_dir=tmp_path / "steps", on_step=lambda s, m: steps_run.append(s))
    assert steps_run == [3, 4, 5] and len(result.history) == 5
    for (k, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="another training run"):
        pm.train(pm.tiny_preference_model(SMALL, seed=1), examples[:-1], config, checkpoint_dir=tmp_path / "steps")


def ddp_examples() -> list[pm.PairExample]:
    """Pairs with unequal weights (1, 2, 3 votes), so a wrong normalization of the weighted mean shows."""
    return [pm.PairExample(e.prompt_id, e.prompt, e.a, e.b, e.p_a, 1.0 + i % 3, e.id) for i, e in enumerate(as_examples(letter_world(), world_pairs("train", prompts=2)))]


def ddp_config(grad_accum: int) -> pm.PreferenceTrainConfig:
    return pm.PreferenceTrainConfig(lr=1e-2, micro_batch_size=2, grad_accum=grad_accum, max_steps=4, warmup_steps=1, schedule="cosine", eval_share=0)


def test_two_processes_follow_the_single_process_loss_curve(tmp_path):
    """torchrun --nproc_per_node=2 on the CPU (gloo), micro 2 × accum 1 × 2 processes, against one
    process with micro 2 × accum 2: the same global batch of 4 pairs."""
    out = tmp_path / "ddp.pt"
    ddp = run_two_workers(__file__, out)
    single = pm.tiny_preference_model(SMALL, seed=2)
    result = pm.train(single, ddp_examples(), ddp_config(grad_accum=2))
    torch.testing.assert_close(torch.tensor(ddp["loss"]), torch.tensor([h["loss/bce"] for h in result.history]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(ddp["grad_norm"]), torch.tensor([h["optim/grad_norm"] for h in result.history]), rtol=1e-4, atol=1e-6)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp["weights"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def _ddp_worker(out: str) -> None:
    from solvers import trainer

    torch.set_num_threads(1)
    rank, world = trainer.init_distributed()
    assert world == 2
    model = pm.tiny_preference_model(SMALL, seed=2)
    result = pm.train(model, ddp_examples(), ddp_config(grad_accum=1))
    if rank == 0:
        torch.save({"loss": [h["loss/bce"] for h in result.history], "grad_norm": [h["optim/grad_norm"] for h in result.history], "weights": model.state_dict()}, out)
    torch.distributed.destroy_process_group()


# ----- the store --------------------------------------------------------------------------------------


def test_examples_from_store_leave_out_learned_answers_and_split_by_prompt(tmp_path):
    world = letter_world()
    pairs = world_pairs("train", prompts=5)
    store = Store(tmp_path / "store")
    store_pairs(store, pairs)
    judged = world.judge(pairs)
    learned = [j.row("cascade:c:000000", 0) for j in judged[:4]]
    for r in learned:
        r["answered_by"] = "learned:pairwise@abc:123456"
    store.write("comparisons", [j.row(world.oracle_id, 0) for j in judged[4:]] + learned)
    examples = pm.examples_from_store(store)
    assert len(examples) == len(pairs) - 4
    assert {(e.a, e.b, e.p_a, e.weight) for e in examples} == {(p.a, p.b, world.prob(p.a, p.b), 3.0) for p in pairs[4:]}
    assert len(pm.examples_from_store(store, exclude_kinds=())) == len(pairs)
    train_set, held = pm.split_by_prompt(examples, 0.4, seed=0)
    assert {e.prompt_id for e in train_set}.isdisjoint({e.prompt_id for e in held}) and len({e.prompt_id for e in held}) == 2
    assert pm.split_by_prompt(list(reversed(examples)), 0.4, seed=0)[1] == list(reversed(held))  # by prompt hash, not order


# ----- bad input: clear errors, nothing written -----------------------------------------------------------


def test_bad_training_data_is_refused_before_anything_is_written(tmp_path):
    ok = as_examples(letter_world(), world_pairs("train", prompts=1))[:4]
    model = pm.tiny_preference_model(SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cases = {
        "no training pairs": [],
        "single-class": [pm.PairExample(e.prompt_id, e.prompt, e.a, e.b, 0.5, 1.0, e.id) for e in ok],
        "not probabilities.*NaN.*p_a=nan": ok[:2] + [pm.PairExample("p", "x", "a", "b", math.nan, 1.0, "bad-one")],
        "not probabilities.*p_a=1.5": ok + [pm.PairExample("p", "x", "a", "b", 1.5, 1.0, "c-2")],
        "weight": ok + [pm.PairExample("p", "x", "a", "b", 1.0, 0.0, "c-3")],
    }
    for message, examples in cases.items():
        with pytest.raises(pm.PreferenceDataError, match=message):
            pm.train(model, examples, FAST, checkpoint_dir=tmp_path / "steps")
    assert not (tmp_path / "steps").exists()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a loss that is not finite: the step is refused, the examples named, the weights left as they were
    with torch.no_grad():
        model.head[-1].bias.fill_(float("nan"))
    broken = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="not finite at step 1") as caught:
        pm.train(model, ok, FAST)
    assert caught.value.example_ids and set(caught.value.example_ids) <= {e.id for e in ok}
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, broken[k], rtol=0, atol=0, equal_nan=True, msg=k)
    # the same through the store: the output folder is never created
    store = Store(tmp_path / "store")
    with pytest.raises(pm.PreferenceDataError, match="no training pairs"):
        pm.fit_preference_model(store, tmp_path / "out", init=model, train_config=FAST)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_that_does_not_match_is_refused(trained, tmp_path):
    _, models = trained
    path = pm.save_preference_model(models["pairwise"], tmp_path / "ckpt")
    with pytest.raises(pm.CheckpointMismatchError, match="head: checkpoint 'pairwise', config 'bt'"):
        pm.load_preference_model(path, pm.PreferenceModelConfig(**{**SMALL.__dict__, "head": "bt"}))
    with pytest.raises(pm.CheckpointMismatchError, match="head_hidden"):
        pm.load_preference_model(path, pm.PreferenceModelConfig(**{**SMALL.__dict__, "head_hidden": 32}))
    # retraining from it with a config it does not match: refused, and the output folder not created
    world = letter_world()
    pairs = world_pairs("train", prompts=3)
    store = Store(tmp_path / "store")
    store_pairs(store, pairs)
    store.write("comparisons", [j.row(world.oracle_id, 0) for j in world.judge(pairs)])
    with pytest.raises(pm.CheckpointMismatchError, match="head"):
        pm.fit_preference_model(store, tmp_path / "out", init=path, model_config=pm.PreferenceModelConfig(**{**SMALL.__dict__, "head": "bt"}), train_config=FAST)
    assert not (tmp_path / "out").exists()
    # files that disagree with each other: the head's settings edited, or the backbone's config
    settings = json.loads((path / pm.PREFERENCE_FILE).read_text())
    (path / pm.PREFERENCE_FILE).write_text(json.dumps({**settings, "head_hidden": 48}))
    with pytest.raises(pm.CheckpointMismatchError, match="head's weights do not fit"):
        pm.load_preference_model(path)
    (path / pm.PREFERENCE_FILE).write_text(json.dumps(settings))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(pm.CheckpointMismatchError, match="backbone"):
        pm.load_preference_model(path)
    with pytest.raises(pm.ModelLoadError, match="not a preference-model checkpoint"):
        pm.load_preference_model(tmp_path)


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp-worker"]:
    _ddp_worker(sys.argv[2])
