"""SecAgg+ (Bell et al., CCS 2020): the server learns Σ n_k·Δ_k and Σ n_k, nothing else.

Pure protocol core, free of Flower: the server app feeds each stage's replies to
`SecAggServer`, the client app runs one `client_*` function per stage and saves
the returned state's `to_dict()` in its persistent state after every call
(`load_state` reads it back).

Stages and payload keys (every payload also carries "stage", the Stage value,
which is also a valid Flower action name):

============  ======================================  ===================================
Stage         server -> client                        client -> server
============  ======================================  ===================================
SETUP         node_id, round_seed (bytes)             pk_enc, pk_mask (32 B each),
                                                      seed_commitment (32 B)
SHARE_KEYS    participants (ids), num_shares,         receivers (ids), ciphertexts
              threshold, vector_length, clip_range    (list of bytes, aligned)
              (float), max_weight, round_seed;
              neighbours (ids, self included),
              pk_enc, pk_mask (lists, aligned)
MASKED_INPUT  senders (ids), ciphertexts (aligned)    rejected (ids), masked (uint32
                                                      array of vector_length + 1)
UNMASK        survivors, dropped (ids, disjoint),     seed_shares, key_shares (lists of
              optional next_round_seed (bytes)        bytes, aligned with the request);
                                                      with next_round_seed: next_pk_enc,
                                                      next_pk_mask, next_seed_commitment
============  ======================================  ===================================

Key advertisement is pipelined: a client's keys for round r+1 ride on its round-r
UNMASK reply, so round r+1 sends SETUP only to participants without them (none,
when the same clients take part) and costs one exchange less. The keys are still
fresh per round and committed to before the round's participants are fixed;
the participants and the other round parameters arrive with SHARE_KEYS.

All values are ConfigRecord types (int, float, str, bytes, lists of ints or of
bytes) except "masked", a numpy uint32 array for an ArrayRecord. Clients absent
from a stage's replies count as dropped; a malformed reply drops its sender.

Guarantees: a client's update stays hidden unless the server colludes with at
least `threshold` of that client's neighbours (even if the server lies about
who dropped, since each client reveals one share kind per peer); the sum never
overflows (see quantize); a malformed or unauthentic message only drops its
sender; a false unmask share is detected (seed commitment, public mask key) and
aborts the round rather than yield a wrong sum. Not covered: a malicious client
can still bias the sum with well-formed but false data (input or keys), and a
false share is not attributed to its sender.
See params for the neighbour graph and the threshold rule.
"""

from fedge.secagg.client import (
    ClientState,
    RoundKeys,
    StoredState,
    client_masked_input,
    client_setup,
    client_share_keys,
    client_unmask,
    load_state,
)
from fedge.secagg.errors import ProtocolError, SecAggAbort
from fedge.secagg.messages import Payload, Stage, StateDict, upload_bytes_per_client
from fedge.secagg.params import SecAggParams
from fedge.secagg.quantize import Quantizer, quantization_error_bound
from fedge.secagg.server import Advertisements, AggregateResult, PublicKeys, SecAggServer

__all__ = [
    "Advertisements",
    "AggregateResult",
    "ClientState",
    "Payload",
    "ProtocolError",
    "PublicKeys",
    "Quantizer",
    "RoundKeys",
    "SecAggAbort",
    "SecAggParams",
    "SecAggServer",
    "Stage",
    "StateDict",
    "StoredState",
    "client_masked_input",
    "client_setup",
    "client_share_keys",
    "client_unmask",
    "load_state",
    "quantization_error_bound",
    "upload_bytes_per_client",
]
