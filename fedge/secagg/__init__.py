"""SecAgg+ (Bell et al., CCS 2020): the server learns Σ n_k·Δ_k and Σ n_k, nothing else.

Pure protocol core, free of Flower: the server app feeds each stage's replies to
`SecAggServer`, the client app runs one `client_*` function per stage and keeps
`ClientState.to_dict()` in its persistent state between messages.

Stages and payload keys (every payload also carries "stage": the Stage value):

=====================  ====================================  =================================
Stage                  server -> client                      client -> server
=====================  ====================================  =================================
SETUP                  node_id, participants (ids),          pk_enc, pk_mask (32 B each),
                       num_shares, threshold, vector_length, seed_commitment (32 B)
                       clip_range, max_weight, round_seed
SHARE_KEYS             neighbours (ids, self included),      receivers (ids),
                       pk_enc, pk_mask (bytes, aligned)      ciphertexts (bytes, aligned)
MASKED_INPUT           senders (ids), ciphertexts (aligned)  rejected (ids),
                                                             masked (uint32 array, L + 1)
UNMASK                 survivors, dropped (ids, disjoint)    seed_shares, key_shares
                                                             (bytes, aligned with the request)
=====================  ====================================  =================================

All values are ConfigRecord types (int, float, str, bytes, lists of ints or of
bytes) except "masked", a numpy uint32 array for an ArrayRecord. Clients absent
from a stage's replies count as dropped. Round parameters: see SecAggParams
(graph, threshold) and quantize (encoding, overflow rule, error bound).
"""

from fedge.secagg.client import (
    ClientState,
    client_masked_input,
    client_setup,
    client_share_keys,
    client_unmask,
)
from fedge.secagg.errors import ProtocolError, SecAggAbort
from fedge.secagg.messages import Payload, Stage, StateDict, upload_bytes_per_client
from fedge.secagg.params import SecAggParams
from fedge.secagg.quantize import Quantizer, quantization_error_bound
from fedge.secagg.server import AggregateResult, SecAggServer

__all__ = [
    "AggregateResult",
    "ClientState",
    "Payload",
    "ProtocolError",
    "Quantizer",
    "SecAggAbort",
    "SecAggParams",
    "SecAggServer",
    "Stage",
    "StateDict",
    "client_masked_input",
    "client_setup",
    "client_share_keys",
    "client_unmask",
    "quantization_error_bound",
    "upload_bytes_per_client",
]
