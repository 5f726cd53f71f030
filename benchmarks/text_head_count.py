"""Text suite, full size, validation split: SA-Merging with MiniLM's connectivity graph built without its config
(6 heads of width 64 guessed) against the graph from its config (12 heads of width 32), and task arithmetic.

    SAMERGE_CACHE=DIR python benchmarks/text_head_count.py 0,1,2     # rows appended to rows.jsonl; ~12 min a seed

Measured 2026-11-30 (2 cores, three seeds): the right head count moves SA-Merging's average normalized validation
score by -0.0004, -0.0010, +0.0011 (default) and -0.0003, -0.0022, +0.0001 (scale=1.0): no measurable effect.
"""
import json, sys, time
import samerge
from samerge.evaluation.catalog import open_suite
from samerge.evaluation.scoring import score_models

for seed in [int(s) for s in sys.argv[1].split(",")]:
    t0 = time.time()
    suite, data = open_suite("text", "full", seed)
    experts = [suite.expert(t) for t in data]
    cfg = suite.config.to_dict()
    enc = [e.encoder for e in experts]
    class WithConfig(dict):
        pass
    base_cfg = WithConfig(suite.base)
    base_cfg.config = cfg  # what a Checkpoint of the model folder carries
    def m(config, **kw):
        return lambda: samerge.merge(base_cfg if config else suite.base, enc, "sa_merging", exclude=suite.exclude, **kw)
    models = {"sa_guessed6": m(None), "sa_config12": m(cfg),
              "sa_guessed6[scale=1.0]": m(None, scale=1.0), "sa_config12[scale=1.0]": m(cfg, scale=1.0),
              "task_arithmetic": lambda: samerge.merge(suite.base, enc, "task_arithmetic", exclude=suite.exclude)}
    rows = score_models(suite, experts, models, label="text", split="val")
    with open("rows.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({"seed": seed, **r}, default=str) + "\n")
    print(f"seed {seed} done in {time.time() - t0:.0f} s", flush=True)
