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
UNMASK        survivors, dropped (ids, disjoint)      seed_shares, key_shares (lists of
                                                      bytes, aligned with the request)
============  ======================================  ===================================

SETUP carries only the round seed, so it can be sent before the round's
participants are final: fedge.server_app.secure_round sends round r+1's SETUP
inside round r's training message and its SHARE_KEYS inside round r's UNMASK
(see `nest`), so that a round with the same clients as the last one takes only
two exchanges. The keys are still fresh for every round.

All values are ConfigRecord types (int, float, str, bytes, lists of ints or of
bytes) except "masked", a numpy uint32 array for an ArrayRecord. Clients absent
from a stage's replies count as dropped; a malformed reply drops its sender.

Guarantees, against a server that follows the protocol (honest-but-curious)
plus fewer than `threshold` of a client's neighbours colluding with it: the
client's update stays hidden; the sum never overflows (see quantize); a
malformed or unauthentic message only drops its sender; a false unmask share
is detected (seed commitment, public mask key) and aborts the round rather
than yield a wrong sum. A server that lies about who dropped gets only one
share kind per peer from each client, so it cannot rebuild both secrets of
one client. It is not fully covered, though: there is no consistency round
(Bonawitz et al. sign the survivor set, which needs a PKI), so a server that
reports all of a client's neighbours as dropped to their share holders can
rebuild their mask keys, hence that client's pairwise masks. Also not
covered: a malicious client can still bias the sum with well-formed but false
data (input or keys), and a false share is not attributed to its sender.
See params for the neighbour graph and the threshold rule.
"""

from fedge.secagg.client import (
    ClientState,
    MaskedInput,
    RoundKeys,
    StoredState,
    client_consistency,
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
from fedge.secagg.server import AggregateResult, SecAggServer

__all__ = [
    "AggregateResult",
    "ClientState",
    "MaskedInput",
    "Payload",
    "ProtocolError",
    "Quantizer",
    "RoundKeys",
    "SecAggAbort",
    "SecAggParams",
    "SecAggServer",
    "Stage",
    "StateDict",
    "StoredState",
    "client_consistency",
    "client_masked_input",
    "client_setup",
    "client_share_keys",
    "client_unmask",
    "load_state",
    "quantization_error_bound",
    "upload_bytes_per_client",
]
