"""The lean forward (solvers/lean_forward.py) against transformers' own forward on a real model. One JSON line.

    python bench/lean_forward.py MODEL_FOLDER [REPEATS]     # e.g. SmolLM2 as a campaign stores it (checkpoints/v0)

CPU, 2 threads, float32: ``CausalLMPolicy.sample`` of 8 prompts × 4 samples × 48 new tokens in one batch of
32, then ``score`` of those samples, with ``lean_forward`` on and off, back to back in alternating order
per repeat. ``ratio_*`` = lean / plain tokens per second, per repeat, median over repeats; by wall clock
and by this process's CPU time (less sensitive to other load on a shared machine). The lean forward stays
only if it is ≥ 1.2× on a real model (../docs/solvers.md).
"""
import json, os, statistics, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
from solvers.causal_lm import CausalLMConfig, CausalLMPolicy, load_model

MODEL = sys.argv[1]; REPEATS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
torch.set_num_threads(2)
PROMPTS = ["Give three tips for staying focused.", "What is the capital of France?", "Write a haiku about rain.",
           "Explain photosynthesis in one sentence.", "Name a red fruit.", "How do I boil an egg?",
           "What is 12 times 7?", "Describe a cat to a child."]
model, tok = load_model(MODEL, device="cpu", dtype="float32")
pol = {flag: CausalLMPolicy(model, tok, CausalLMConfig(max_new_tokens=48, batch_size=32, device="cpu", dtype="float32", lean_forward=flag)) for flag in (True, False)}
for flag in (True, False):
    pol[flag].sample(PROMPTS[:2], 2, seed=0)  # warm up
def timed(fn):
    w, c = time.perf_counter(), time.process_time(); out = fn(); return out, time.perf_counter() - w, time.process_time() - c
rows = []
for r in range(REPEATS):
    rec = {}
    for flag in ((True, False) if r % 2 == 0 else (False, True)):
        s, w, c = timed(lambda: pol[flag].sample(PROMPTS, 4, seed=r))
        n = sum(x.n_tokens for row in s for x in row)
        ps = [p for p, row in zip(PROMPTS, s) for _ in row]; rs = [x.text for row in s for x in row]; tk = [x.token_ids for row in s for x in row]
        _, ws, cs = timed(lambda: pol[flag].score(ps, rs, tokens=tk))
        rec["lean" if flag else "plain"] = {"tokens": n, "sample_wall": n / w, "sample_cpu": n / c, "score_wall": n / ws, "score_cpu": n / cs}
    rows.append(rec); print(json.dumps(rec), file=sys.stderr, flush=True)
med = lambda key, v: statistics.median(x[v][key] for x in rows)
ratio = lambda key: statistics.median(x["lean"][key] / x["plain"][key] for x in rows)
out = {k: ratio(k) for k in ("sample_wall", "sample_cpu", "score_wall", "score_cpu")}
out = {f"ratio_{k}": v for k, v in out.items()}
out.update({f"{v}_{k}_tokens_per_s": med(k, v) for v in ("lean", "plain") for k in ("sample_wall", "sample_cpu", "score_wall", "score_cpu")})
out["repeats"] = REPEATS; out["batch"] = "32 rows (8 prompts x 4) x 48 new tokens, 2 threads, float32"
print(json.dumps(out))
