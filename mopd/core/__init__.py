"""The leaf layer: data types, the algorithm's math, errors and the engine protocol.

Every package (rollout, trainer, envs, toolbox, and mopd's application modules) builds on it;
it imports nothing of the project, which the architecture test (import-linter contracts in
pyproject.toml) enforces.
"""
