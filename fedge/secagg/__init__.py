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
SETUP         node_id, round_seed (bytes)             pk_enc, pk_mask, pk_sign (32 B
                                                      each), seed_commitment (32 B)
SHARE_KEYS    participants (ids), num_shares,         receivers (ids), ciphertexts
              threshold, vector_length, clip_range    (list of bytes, aligned)
              (float), max_weight, round_seed;
              neighbours (ids, self included),
              pk_enc, pk_mask (lists, aligned);
              verifiers (ids), pk_sign (aligned)
MASKED_INPUT  senders (ids), ciphertexts (aligned)    rejected (ids), masked (uint32
                                                      array of vector_length + 1)
CONSISTENCY   survivors (ids)                         signature (64 B, Ed25519)
UNMASK        survivors, signers (ids),               seed_shares, key_shares (lists of
              signatures (aligned)                    bytes: held survivors, then the
                                                      other held nodes, ascending ids)
============  ======================================  ===================================

SETUP carries only the round seed, so it can be sent before the round's
participants are final: fedge.server_app.secure_round sends round r+1's SETUP
inside round r's training message and its SHARE_KEYS inside round r's UNMASK
(see `nest`), so that a round with the same clients as the last one takes
three exchanges (training, consistency, unmask). The keys, the signing key
included, are still fresh for every round.

All values are ConfigRecord types (int, float, str, bytes, lists of ints or of
bytes) except "masked", a numpy uint32 array for an ArrayRecord. Clients absent
from a stage's replies count as dropped; a malformed reply drops its sender.

Guarantees. Against a malicious server (it may drop, reorder, edit and invent
messages, and show each client a different survivor set), plus fewer than
`threshold` of a client's neighbours colluding with it and fewer than
2·quorum − n participants signing for it (see SecAggParams.signature_quorum):
a client's update stays hidden. The consistency round (Bell et al. 2020,
malicious setting; Bonawitz et al. 2017) enforces it: each client signs the
announced survivor set once per round with a per-round Ed25519 key advertised
at SETUP, only if it is in the set and at least t of the nodes whose shares it
holds (itself included) are too; before revealing, a holder needs a quorum of
valid signatures from distinct participants in the set, on the very set it
signed. It then derives who dropped itself (the nodes whose shares it holds,
minus the set) and reveals one share kind per node. Any two sets that reach the
quorum share a signer, so all honest holders unmask for one set, and a client
is unmasked only together with t of its share holders, whose pairwise masks
with it stay on. A server that garbles share ciphertexts to make a mask
one-sided gains nothing either: a client keeps at least t − 1 partners, so a
set that drops them all leaves it fewer than t held survivors and it refuses,
and at most k − t < t of its other holders remain to reveal its seed.

Against a malicious client: a malformed or unauthentic message only drops its
sender; the sum never overflows (see quantize). A report that a peer's shares
failed authentication drops both ends when it stands alone (the server cannot
tell who lies), and drops only the node in two or more such disputes (a node
accusing, or garbling shares for, many peers); a false report thus never
removes the accused alone. A wrong unmask share is outvoted: the server
rebuilds each secret from a t-subset of the shares that matches its public
commitment (seed commitment, public mask key), checks every other share
against that polynomial, names the holder of a wrong one in
`AggregateResult.unmask_faults`, and aborts only when no t-subset matches
(e.g. exactly t shares, one wrong).

Assumed, not enforced: there is no PKI, so the server relays every public
key; a server that substitutes keys (man in the middle between clients: its
own pk_enc to read shares, or its own pk_sign to forge signatures, i.e.
Sybil clients) is out of scope, as in Bell et al. without a PKI, and would
already read the shares without the consistency round. Also out of scope: a
malicious client can still bias the sum with well-formed but false data
(input validity needs range proofs); and the quorum is a majority of the
round's participants, so a round needs more than half of them to sign.
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
