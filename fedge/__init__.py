"""fedge: federated learning on Flower with SecAgg+, differential privacy and edge export.

Importing the package pulls in no torch, so the edge runtime stays torch-free.
"""

__version__ = "0.1.0"
