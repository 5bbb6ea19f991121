"""Real Flower deployments: certificates, SuperNode keys and a local federation.

Torch-free: a Raspberry Pi with `fedge[edge]` can run `fedge certs` too.
"""

from fedge.deploy.certs import CertificateReport, CertificateSet, create_certificates
from fedge.deploy.local import DeploymentError, LocalDeployment, NodeSpec
from fedge.deploy.processes import ManagedProcess

__all__ = [
    "CertificateReport",
    "CertificateSet",
    "DeploymentError",
    "LocalDeployment",
    "ManagedProcess",
    "NodeSpec",
    "create_certificates",
]
