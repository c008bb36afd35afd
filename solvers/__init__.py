"""How the policy moves: exact tabular dynamics, policies, losses and the trainer.

Never imports oracles or pipelines, and not Prefect: usable from a notebook or a plain script.
"""
