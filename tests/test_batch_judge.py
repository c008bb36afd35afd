"""The LLM judge through the Batch API (oracles/batch_judge.py, pipelines/batch_judging.py), against the
local stub's Files and Batches endpoints (tests/openai_stub.py), talked to with the real ``openai`` client."""

import json
import time

import pytest

from data import Store
from data.keys import comparison_id, prompt_id, response_id
from data.rounds import rounds_table
from oracles.batch_judge import RECORDS, BatchJudge, BatchSettings
from oracles.llm_judge import LLMJudge, LLMJudgeConfig
from oracles.protocol import Pair
from openai_stub import StubConfig, StubServer, rule_p_first

KEY = "sk-test-batch-judge-0123456789abcdef"
PRICES = {"stub-judge": (1.0, 2.0)}


def _store_with_pairs(tmp_path, n_prompts=3, k=3, *, faults: dict | None = None, score=lambda i, slot: slot + 1 + i) -> tuple[Store, list[Pair]]:
    """A store holding prompts and round-1 responses whose texts carry the stub's ``score=``; every
    ordered pair of each prompt's responses. ``faults``: (prompt index, slot) → text appended."""
    store = Store(str(tmp_path / "store"))
    prompts, responses, pairs = [], [], []
    for i in range(n_prompts):
        text = f"prompt {i}"
        pid = prompt_id(text)
        prompts.append({"prompt_id": pid, "prompt": text, "split": "train", "source": "test"})
        group = []
        for slot in range(k):
            rid = response_id(pid, "v0", 1, slot)
            body = f"answer {slot} score={score(i, slot)}" + (faults or {}).get((i, slot), "")
            responses.append({"response_id": rid, "round": 1, "policy_version": "v0", "prompt_id": pid, "text": body, "n_tokens": 3, "finish_reason": "stop", "token_ids": None})
            group.append((rid, body))
        pairs += [Pair(pid, text, *x, *y) for x in group for y in group if x != y]
    store.write("prompts", prompts)
    store.write("responses", responses)
    return store, pairs


def _judge(server, **changes) -> LLMJudge:
    return LLMJudge(LLMJudgeConfig(model="stub-judge", base_url=server.base_url, api_key=KEY, prices=PRICES, **changes))


def _stored(store: Store, oracle_id: str):
    comps = store.read("comparisons")
    return comps[comps["oracle_id"] == oracle_id]


def _records(store: Store, round: int = 1) -> list[dict]:
    folder = f"{RECORDS}/round-{round}"
    return [json.loads(store.read_bytes(f"{folder}/{n}")) for n in store.list_files(folder) if n.endswith(".json")]


def _until_done(batch: BatchJudge, round: int = 1, tries: int = 40) -> None:
    for _ in range(tries):
        batch.collect()
        if batch.pending(round=round) == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"still pending: {batch.status(round=round)}")


# ----- one home for questions and answers ------------------------------------------------------------------


def test_the_batch_judge_gives_the_online_probabilities_at_the_batch_price(tmp_path):
    store, pairs = _store_with_pairs(tmp_path)
    with StubServer(StubConfig(position_bias=0.1, api_key=KEY)) as server:
        online = _judge(server).judge(pairs)
        batch = BatchJudge(_judge(server), store, BatchSettings(discount=0.5))
        out = batch.submit(pairs, round=1)
        assert out["batches_created"] == 1 and batch.pending(round=1) == len(pairs)
        _until_done(batch)
        (created,) = server.batches.values()
        lines = [json.loads(x) for x in server.files[created["input_file_id"]]["_data"].decode().splitlines()]
    assert len(lines) == 2 * len(pairs), "both orders of every pair"
    ab = lines[0]
    assert ab["method"] == "POST" and ab["url"] == "/v1/chat/completions"
    p = pairs[0]
    assert ab["custom_id"] == f"{comparison_id(p.prompt_id, p.a_id, p.b_id, batch.oracle_id)}:ab", "custom_id = comparison key + order"
    user = ab["body"]["messages"][-1]["content"]
    assert "<<<BEGIN A " in user and p.a in user and ab["body"]["logprobs"] is True, "the online judge's template, fences and logprobs"
    comps = _stored(store, batch.oracle_id).set_index("comparison_id")
    assert len(comps) == len(pairs)
    for j in online:
        row = comps.loc[comparison_id(j.pair.prompt_id, j.pair.a_id, j.pair.b_id, batch.oracle_id)]
        assert row["p_a"] == pytest.approx(j.p_a, abs=1e-12), "same probability online and in batch"
        assert j.p_a == pytest.approx(rule_p_first(j.pair.a, j.pair.b), abs=1e-9), "both orders cancel the position bias"
        assert row["cost_usd"] == pytest.approx(j.cost_usd * 0.5), "the batch price is half the online one"
        assert json.loads(row["detail"])["orders"][0]["answers"][0]["source"] == "logprobs"


def test_votes_give_the_online_probabilities_too(tmp_path):
    """Without log-probs P comes from votes: 4 per order (``n``), a tie counting ½; the stub's votes are
    exact for P a multiple of ¼, so online and batch agree exactly."""
    store, pairs = _store_with_pairs(tmp_path, n_prompts=2, k=3, score=lambda i, slot: (1, 3, 1)[slot])
    with StubServer(StubConfig(logprobs=False)) as server:
        settings = dict(use_logprobs=False, votes=4, temperature=1.0)
        online = _judge(server, **settings).judge(pairs)
        batch = BatchJudge(_judge(server, **settings), store)
        batch.submit(pairs, round=1)
        _until_done(batch)
    comps = _stored(store, batch.oracle_id).set_index("comparison_id")
    for j in online:
        row = comps.loc[comparison_id(j.pair.prompt_id, j.pair.a_id, j.pair.b_id, batch.oracle_id)]
        assert row["p_a"] == pytest.approx(j.p_a) == pytest.approx(rule_p_first(j.pair.a, j.pair.b)) and row["n_votes"] == j.n_votes == 8


def test_the_oracle_id_is_the_online_judges(tmp_path):
    store, _ = _store_with_pairs(tmp_path, n_prompts=1)
    with StubServer(StubConfig()) as server:
        assert BatchJudge(_judge(server), store).oracle_id == _judge(server).oracle_id


# ----- failures, expiry, crashes -------------------------------------------------------------------------


def test_failed_and_expired_requests_are_resubmitted_and_nothing_is_lost_or_judged_twice(tmp_path):
    faults = {(0, 1): " !fault=500x1", (1, 2): " !fault=garbagex99"}  # a server error once; an unreadable answer
    store, pairs = _store_with_pairs(tmp_path, faults=faults)
    with StubServer(StubConfig(expire_batches=1, batch_delay_s=0.2)) as server:
        batch = BatchJudge(_judge(server), store, BatchSettings(on_failure="resubmit", max_resubmits=3))
        batch.submit(pairs, round=1)
        assert batch.collect() == [] and batch.pending(round=1) == len(pairs), "in progress: nothing yet"
        _until_done(batch)
        assert server.batches_created >= 2
        statuses = [b["status"] for b in server.batches.values()]
    assert statuses[0] == "expired" and all(s == "completed" for s in statuses[1:])
    comps = _stored(store, batch.oracle_id)
    assert sorted(comps["comparison_id"]) == sorted({comparison_id(p.prompt_id, p.a_id, p.b_id, batch.oracle_id) for p in pairs}), "every pair once"
    abstained = comps[comps["p_a"].isna()]
    assert len(abstained) and abstained["error"].str.startswith("abstained: ").all(), "an unreadable answer is an abstention"
    assert batch.status(round=1)["batch/given_up"] == 0
    assert not store.list_files(f"{RECORDS}/open"), "no open marker left once everything is collected"


def test_failed_requests_can_go_to_the_online_judge(tmp_path):
    store, pairs = _store_with_pairs(tmp_path, n_prompts=2)
    with StubServer(StubConfig(expire_batches=1)) as server:
        batch = BatchJudge(_judge(server), store, BatchSettings(on_failure="online"))
        batch.submit(pairs, round=1)
        _until_done(batch)
        assert server.batches_created == 1, "no second batch: the rest went online"
        (record,) = batch.records(round=1)
    assert record["online"] > 0 and record["status"] == "expired"
    comps = _stored(store, batch.oracle_id)
    assert len(comps) == len(pairs) and comps["p_a"].notna().all()
    # both orders of each pair: half the batch's lines answered before it expired, the other half online
    assert server.chats == {"batch": len(pairs), "online": len(pairs)}, "each pair asked once"


def test_a_pair_that_keeps_failing_is_given_up_and_not_asked_again(tmp_path):
    store, pairs = _store_with_pairs(tmp_path, n_prompts=1, faults={(0, 0): " !fault=400x99"})
    with StubServer(StubConfig()) as server:
        batch = BatchJudge(_judge(server), store, BatchSettings(max_resubmits=1))
        batch.submit(pairs, round=1)
        _until_done(batch)
        assert server.batches_created == 2
        again = batch.submit(pairs, round=1)  # a resumed round
        assert again["batches_created"] == 0 and server.batches_created == 2
    given_up = batch.status(round=1)["batch/given_up"]
    assert given_up == 4, "response 0 in either slot of the prompt's 6 ordered pairs fails"
    assert len(_stored(store, batch.oracle_id)) == len(pairs) - given_up


class Killed(BaseException):
    """Stands for the process dying at that line (a BaseException: nothing catches it)."""


@pytest.mark.parametrize("where", ["after_upload", "after_create"])
def test_killed_between_upload_create_and_collect_loses_and_duplicates_nothing(tmp_path, where):
    store, pairs = _store_with_pairs(tmp_path)
    with StubServer(StubConfig(batch_delay_s=0.3)) as server:
        first = BatchJudge(_judge(server), store)
        create = first.client.batches.create

        def dies(**kw):
            if where == "after_create":
                create(**kw)  # the server created it; the process dies before recording its id
            raise Killed()

        first.client.batches.create = dies
        with pytest.raises(Killed):
            first.submit(pairs, round=1)
        (record,) = first.records(round=1)
        assert record["file_id"] and record["batch_id"] is None and record["state"] == "new"
        uploads = len(server.files)

        resumed = BatchJudge(_judge(server), store)  # a new process: only the store survives
        resumed.submit(pairs, round=1)
        assert len(server.files) == uploads, "the file is found again, not uploaded twice"
        assert server.batches_created == 1, "one batch for these pairs, however often the round starts"
        resumed.submit(pairs, round=1)  # killed between creation and collection: the round runs again
        assert server.batches_created == 1
        _until_done(BatchJudge(_judge(server), store))
    assert len(_stored(store, resumed.oracle_id)) == len(pairs)
    assert server.chats == {"batch": 2 * len(pairs)}, "each pair asked once (both orders), in the one batch"


def test_the_collector_sends_a_batch_whose_round_died_before_sending_it(tmp_path):
    store, pairs = _store_with_pairs(tmp_path, n_prompts=1)
    with StubServer(StubConfig()) as server:
        first = BatchJudge(_judge(server), store)
        first.client.files.create = lambda **kw: (_ for _ in ()).throw(Killed())
        with pytest.raises(Killed):
            first.submit(pairs, round=1)
        assert not server.files and BatchJudge(_judge(server), store).pending(round=1) == len(pairs)
        _until_done(BatchJudge(_judge(server), store))  # the collector alone, no round running
        assert server.batches_created == 1
    assert len(_stored(store, first.oracle_id)) == len(pairs)


def test_the_budget_is_checked_at_batch_prices_before_submitting(tmp_path):
    store, pairs = _store_with_pairs(tmp_path)
    with StubServer(StubConfig()) as server:
        probe = BatchJudge(_judge(server), store)
        from oracles.llm_judge import worst_case_usd

        per_pair = worst_case_usd(probe.config, probe.online.template, pairs[0])
        budget = per_pair * 4.5  # room for 4 pairs at the batch price (the online price would fit 2)
        batch = BatchJudge(_judge(server, budget_usd=budget), store)
        out = batch.submit(pairs, round=1)
        assert out["pairs_submitted"] == 4 and out["over_budget"] == len(pairs) - 4
        _until_done(batch)
        again = batch.submit(pairs, round=1)  # the spent cost (below the worst case) frees room for more
        _until_done(batch)
    spent = sum(r.get("cost_usd", 0.0) for r in batch.records(round=1))
    assert again["pairs_submitted"] > 0 and spent <= budget


def test_no_key_in_records_or_uploaded_files(tmp_path):
    store, pairs = _store_with_pairs(tmp_path, n_prompts=1)
    with StubServer(StubConfig(api_key=KEY)) as server:
        batch = BatchJudge(_judge(server), store)
        batch.submit(pairs, round=1)
        _until_done(batch)
        assert all(KEY.encode() not in f["_data"] for f in server.files.values())
    assert _records(store) and all(KEY not in json.dumps(r) for r in _records(store))
    assert KEY not in repr(batch)


# ----- a campaign round waits for its batches like a round waits for people --------------------------------


def _campaign(tmp_path, server, **batch):
    from pipelines.config import parse_config

    return parse_config({
        "name": "batched", "store": str(tmp_path / "campaign"), "rounds": 1,
        "games": [{"kind": "cyclic", "n": 5}],
        "policy": {"kind": "tabular", "reference_spread": 0.0},  # uniform: the samples differ
        "pairing": {"strategy": "all_pairs"},
        "oracle": {"kind": "llm_judge", "model": "stub-judge", "base_url": server.base_url, "api_key_env": "NASHFLOW_TEST_BATCH_KEY",
                   "prices": {"stub-judge": [1.0, 2.0]}, "mode": "batch", "batch": {"poll_interval_s": 0.2, **batch}},
        "solver": {"algorithm": "inpo", "beta": 0.5},
        "sampling": {"samples_per_prompt": 5},
    })


def _every_pair_once(config, batches_created: int, server) -> None:
    from pipelines import stages
    from pipelines.oracle_factory import oracle_spec
    from pipelines.world import World

    store = Store(config.store)
    oracle_id = oracle_spec(config.oracle, config, World(config)).oracle_id
    pairs = stages.pair_responses(store, round=1, policy_version="v0", strategy=config.pairing.strategy, skip_identical=config.pairing.skip_identical, seed=config.seed)
    comps = _stored(store, oracle_id)
    wanted = {comparison_id(p.prompt_id, p.a_id, p.b_id, oracle_id) for p in pairs}
    assert wanted and wanted <= set(comps["comparison_id"]), "every pair judged (or abstained)"
    assert server.chats["batch"] == 2 * len(pairs), "each pair asked once (both orders), through the batches"
    assert server.batches_created == batches_created
    assert list(rounds_table(store)["round"]) == [1]


@pytest.mark.slow
def test_a_round_polls_in_place_until_its_batches_are_done(tmp_path, prefect_harness, monkeypatch):
    from pipelines import flows

    monkeypatch.setenv("NASHFLOW_TEST_BATCH_KEY", KEY)
    with StubServer(StubConfig(api_key=KEY, batch_delay_s=0.5, expire_batches=1)) as server:
        config = _campaign(tmp_path, server)
        metrics = flows.alignment_round(config, 1)
        _every_pair_once(config, 2, server)  # the expired batch's unanswered half went into a second batch
    assert metrics["batch/pending"] == 0 and metrics["pref/skipped"] == 0 and metrics["cost/usd"] > 0


@pytest.mark.slow
def test_a_round_suspends_and_the_collector_resumes_it_without_a_second_batch(tmp_path, prefect_harness, monkeypatch):
    """Under a deployment the round suspends (its process ends) and the body runs again from the top
    when the collector resumes it; here the suspension is the run ending where ``suspend_flow_run``
    is called, and the resume is the same round run again."""
    from pipelines import batch_judging, flows

    class Suspended(Exception):
        pass

    def suspend(**kw):
        raise Suspended(kw["key"])

    resumed = []
    monkeypatch.setenv("NASHFLOW_TEST_BATCH_KEY", KEY)
    monkeypatch.setattr(batch_judging, "can_suspend", lambda: True)
    monkeypatch.setattr(batch_judging, "suspend_flow_run", suspend)
    monkeypatch.setattr(batch_judging, "resume_run", resumed.append)
    with StubServer(StubConfig(api_key=KEY, batch_delay_s=1.0, expire_batches=1)) as server:
        config = _campaign(tmp_path, server)
        with pytest.raises(Suspended):
            flows.alignment_round(config, 1)
        store = Store(config.store)
        assert batch_judging.waiting_rounds(store, folder=batch_judging.WAITING)
        with pytest.raises(Suspended):  # resumed too early (or a Retry): it finds its batch and suspends again
            flows.alignment_round(config, 1)
        (marker,) = batch_judging.waiting_rounds(store, folder=batch_judging.WAITING)
        keys = [b["metadata"]["nashflow_key"] for b in server.batches.values()]
        assert len(set(keys)) == len(keys) and keys[0] in {r["key"] for r in _records(store)}, "one batch per record, none repeated"
        for _ in range(50):  # the scheduled collector
            out = batch_judging.collect_judge_batches(config)
            if out["resumed_rounds"]:
                break
            time.sleep(0.2)
        assert out["resumed_rounds"] == [1] and resumed == [marker["flow_run_id"]] and out["pending"] == 0
        assert not batch_judging.waiting_rounds(store, folder=batch_judging.WAITING)
        flows.alignment_round(config, 1)  # the resumed body: collects, submits nothing
        _every_pair_once(config, 2, server)
