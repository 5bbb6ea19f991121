"""Vertical federated learning: parties holding different columns of the same rows.

`psi` aligns the parties' rows by private set intersection and `hetero_lr` trains a
logistic regression across their columns under Paillier encryption. Neither module
imports Flower; the Flower roles live beside them.
"""
