"""Differential privacy: clipping, noise, accounting, local DP-SGD and auditing.

Nothing is imported here on purpose, and nothing here imports Flower:
`clipping` and `noise` need only numpy, so a torch-free edge client can clip and
noise its update; `accountant` and `local_dp` need opacus (and torch), `audit`
needs scipy. Import the submodule you need.
"""
