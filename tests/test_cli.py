"""The command line, end to end in subprocesses, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def nashflow(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"nashflow {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_help_lists_the_commands():
    out = nashflow("--help").stdout
    for command in ("run", "demo", "status", "solve", "export", "eval"):
        assert command in out


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["status"], ["solve"], ["export"], ["eval"]])
def test_help_shows_no_type_on_a_flag(command):
    out = nashflow(*command, "--help").stdout
    assert "--help" in out and "<bool>" not in out
    if command == ["status"]:
        assert "--fit-gap " in out and "--epochs <int range>" in out  # an option that takes a value keeps its type


def test_solve_json_converges():
    # a random game: uniform play (π_0 = μ) is not its equilibrium, so the gap has somewhere to fall from
    doc = json.loads(nashflow("solve", "--game", "random", "--n", "5", "--beta", "0.5", "--iterations", "30", "--json").stdout)
    its = doc["iterations"]
    assert len(its) == 31 and doc["nash_residual"] < 1e-12
    assert its[0]["duality_gap"] > 1e-4 and its[-1]["duality_gap"] < 1e-9


def test_solve_refuses_a_bad_matrix(tmp_path):
    import numpy as np

    np.save(tmp_path / "bad.npy", np.array([[0.5, 0.8], [0.8, 0.5]]))
    proc = nashflow("solve", "--game", str(tmp_path / "bad.npy"), check=False)
    assert proc.returncode == 2
    assert "bad.npy" in proc.stderr and "P + Pᵀ = 1" in proc.stderr


@pytest.mark.slow
def test_run_status_export(tmp_path):
    store = str(tmp_path / "store")
    out = nashflow("run", "examples/tabular_inpo.yaml", "--store", store, "--rounds", "2")
    assert "round 2/2" in out.stderr
    assert "(round took " in out.stderr and " s since start)" in out.stderr  # the progress line names its times
    status = nashflow("status", store).stdout
    assert "gap" in status and "inpo" in status and "stage time: seconds the round" in status
    exported = nashflow("export", store, str(tmp_path / "pairs.jsonl"))
    rows = [json.loads(line) for line in open(tmp_path / "pairs.jsonl")]
    assert rows and {"prompt", "chosen", "rejected", "p_chosen"} <= set(rows[0])
    # every command states what it counted, and the counts add up: export = judgments − abstained − ties
    import re

    judgments, train, evaluation, abstained, ties = map(int, re.search(r"store: (\d+) judgments \(rounds 1–2\) = (\d+) of training pairs \+ (\d+) of evaluation pairs; (\d+) abstained, (\d+) ties", status).groups())
    assert judgments == train + evaluation and train > 0
    assert f"wrote {len(rows)} pairs to" in exported.stderr and len(rows) == judgments - abstained - ties
    assert f"the store's {judgments} judgments ({train} of training pairs + {evaluation} of evaluation pairs, every round) less {abstained} abstained and {ties} ties" in exported.stderr


def test_bad_config_names_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstore: s\nrounds: 2\ngames: [{kind: cyclic}]\nsolver: {algorithm: nash_mp, beta: -1}\n")
    proc = nashflow("run", str(bad), check=False)
    assert proc.returncode == 2
    assert "bad.yaml: solver.beta: Input should be greater than 0" in proc.stderr
