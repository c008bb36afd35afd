"""When things happen: Prefect flows and tasks, the campaign config, and the CLI.

The only package that imports Prefect, and the only one that imports both oracles and solvers.
"""
