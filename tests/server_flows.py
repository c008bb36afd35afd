"""Test-only flows for tests/test_prefect_server.py, deployed next to prefect.yaml's by that test: the
production round (``pipelines.deployments.single_round``) with one stage slowed down so that a SIGKILL
lands in the middle of it, or with an oracle that holds a secret and quotes it carelessly. Nothing in
pipelines/ imports this module."""

from __future__ import annotations

import functools
import time

from prefect import flow, get_run_logger

from pipelines import deployments, flows, secrets, stages


class SlowOracle:
    """The campaign's oracle, answering each batch ``seconds`` late."""

    def __init__(self, oracle, seconds: float):
        self.oracle, self.seconds, self.oracle_id = oracle, seconds, oracle.oracle_id

    def judge(self, pairs):
        time.sleep(self.seconds)
        return self.oracle.judge(pairs)


class CarelessOracle:
    """An oracle whose client holds an API key, logs it by mistake and then fails with an error that
    quotes it, as a misbehaving HTTP client might."""

    def __init__(self, oracle, key: str):
        self.oracle, self.key, self.oracle_id = oracle, key, oracle.oracle_id

    def judge(self, pairs):
        get_run_logger().info("connecting with Authorization: Bearer %s", self.key)
        raise ValueError(f"401 Unauthorized: Incorrect API key provided: {self.key}")


@flow(name="nashflow-test-round")
def server_round(config_path: str, round: int, store: str, mode: str, seconds: float = 0.0, secret_block: str | None = None, secret_env: str | None = None) -> dict:
    """``mode``: slow-judge (chunks of 256 pairs, each oracle call ``seconds`` late), slow-train (each causal-LM optimizer step
    ``seconds`` late), slow-update (the update stage starts ``seconds`` late), careless-oracle."""
    build = flows.build_oracle
    if mode == "slow-judge":  # chunks of 256 pairs, each answered `seconds` late
        flows.build_oracle = lambda config, world: SlowOracle(build(config, world), seconds)
        stages.judge_pairs = functools.partial(stages.judge_pairs, chunk_size=256)
    elif mode == "slow-train":
        from solvers import trainer

        step = trainer.train_step

        def slow_step(state, batch):
            time.sleep(seconds)
            return step(state, batch)

        trainer.train_step = slow_step
    elif mode == "slow-update":
        update = stages.update_policy

        def slow_update(*args, **kwargs):  # runs inside the update's GPU slot
            start = time.time()
            time.sleep(seconds)
            out = update(*args, **kwargs)
            get_run_logger().info("slow update held the GPU from %.3f to %.3f", start, time.time())
            return out

        stages.update_policy = slow_update
    elif mode == "careless-oracle":
        block_key = secrets.resolve(secret_block_name=secret_block)
        env_key = secrets.resolve(env_var=secret_env)
        get_run_logger().info("resolved the judge's key from block %s and the environment variable %s", secret_block, secret_env)
        flows.build_oracle = lambda config, world: CarelessOracle(build(config, world), block_key + "|" + env_key)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return deployments.single_round.fn(config_path, round, store=store)
