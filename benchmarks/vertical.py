"""Vertical FL: hetero LR accuracy vs centralized LR, its cost per epoch, and PSI cost.

Printed as one JSON object on stdout. `lr`: the bundled breast-cancer column split
(guest: label + 10 features, host: 20) and diabetes (progression above the median;
guest: label + 5 features, host: 5), aligned by PSI, the joined rows split 80/20 (seeded); fedge's
Guest/Host run the four-message batch protocol in this process (the coordinator's
relay is a dict hand-off; bytes counted are the message values' lengths), and
scikit-learn's LogisticRegression (same L2: C = 1/(l2·n), lbfgs) trains on the same
joined, standardized training rows. AUC on the held-out 20%. `psi`: two parties of
N IDs each with half in common, the full two-way PSI (offer, answer, intersect).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from sklearn.datasets import load_diabetes
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from fedge.vertical.data import PartyTable, breast_cancer_parties
from fedge.vertical.hetero_lr import Guest, Host, Settings, loss_from_pad, public_key_bytes
from fedge.vertical.psi import PsiParty


def _size(message: dict) -> int:
    return sum(len(v) for v in message.values())


def psi_cost(n: int) -> dict:
    a = [f"id-{i}" for i in range(n)]
    b = [f"id-{i}" for i in range(n // 2, n + n // 2)]
    start = time.perf_counter()
    guest, host = PsiParty(a, max_ids=n), PsiParty(b, max_ids=n)
    og, oh = guest.offer(), host.offer()
    ag, ah = guest.answer(oh), host.answer(og)
    common = guest.intersect(ah)
    assert common == host.intersect(ag) and len(common) == n - n // 2
    sent = len(og.setup) + len(og.request) + len(ag) + len(oh.setup) + len(oh.request) + len(ah)
    return {"ids_per_party": n, "seconds": time.perf_counter() - start, "bytes_total": sent}


def diabetes_parties() -> tuple[PartyTable, PartyTable]:
    """scikit-learn's diabetes table, label = progression above its median."""
    data = load_diabetes()
    ids = [f"d{i:03d}" for i in range(len(data.target))]
    rng = np.random.default_rng(0)
    g, h = rng.permutation(np.arange(0, 400)), rng.permutation(np.arange(40, 442))
    y = (data.target > np.median(data.target)).astype(float)
    names = list(map(str, data.feature_names))
    return (
        PartyTable([ids[i] for i in g], data.data[g, :5], y[g], names[:5]),
        PartyTable([ids[i] for i in h], data.data[h, 5:], None, names[5:]),
    )


def hetero_lr(
    name: str,
    guest_t: PartyTable,
    host_t: PartyTable,
    bits: int,
    epochs: int,
    batch: int,
    settings: Settings,
) -> dict:
    psi_g = PsiParty(guest_t.ids, max_ids=10**6)
    psi_h = PsiParty(host_t.ids, max_ids=10**6)
    og, oh = psi_g.offer(), psi_h.offer()
    answer_g, answer_h = psi_g.answer(oh), psi_h.answer(og)
    common = psi_g.intersect(answer_h)
    assert common == psi_h.intersect(answer_g)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(common))
    cut = int(0.8 * len(common))
    train_ids = [common[i] for i in order[:cut]]
    test_ids = [common[i] for i in order[cut:]]
    gt, ht = guest_t.aligned(train_ids), host_t.aligned(train_ids)
    s = Settings(key_bits=bits, lr=settings.lr, l2=settings.l2, min_batch=settings.min_batch)
    guest, host = Guest(gt.x, gt.y, s), Host(ht.x, s)
    guest.meet(public_key_bytes(host.public), ht.x.shape[1])
    host.meet(public_key_bytes(guest.public), gt.x.shape[1])
    epoch_s, epoch_bytes, losses = [], [], []
    pending: dict = {}
    for _ in range(epochs):
        start, sent, batch_losses = time.perf_counter(), 0, []
        perm = rng.permutation(len(train_ids))
        for idx in np.split(perm, list(range(batch, len(perm) - batch + 1, batch))):
            b = idx.tolist()
            if pending:
                host.apply(pending)
            m1 = host.logits(b)
            m2, pad = guest.residuals(b, m1)
            m3, loss_pair = host.gradients(m2)
            pending = guest.unmask(m3)
            sent += _size(m1) + _size(m2) + _size(m3) + _size(pending) + 8 * len(b) * 2
            batch_losses.append(loss_from_pad(loss_pair, pad, public_key_bytes(host.public)))
        epoch_s.append(time.perf_counter() - start)
        epoch_bytes.append(sent)
        losses.append(float(np.mean(batch_losses)))
    host.apply(pending)
    tg, th = guest_t.aligned(test_ids), host_t.aligned(test_ids)
    score = guest.scores(tg.x) + guest.bias + host.scores(th.x)
    x_train = np.hstack([gt.x, ht.x])
    mean, std = x_train.mean(0), x_train.std(0)
    central = LogisticRegression(C=1 / (settings.l2 * len(train_ids)), max_iter=5000)
    central.fit((x_train - mean) / std, gt.y)
    x_test = (np.hstack([tg.x, th.x]) - mean) / std
    return {
        "table": name,
        "key_bits": bits,
        "rows_joined": len(common),
        "rows_train": len(train_ids),
        "epochs": epochs,
        "batch_size": batch,
        "seconds_per_epoch": float(np.mean(epoch_s)),
        "bytes_per_epoch": int(np.mean(epoch_bytes)),
        "loss_per_epoch": losses,
        "auc_vertical": float(roc_auc_score(tg.y, score)),
        "auc_central_sklearn": float(roc_auc_score(tg.y, central.decision_function(x_test))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--key-bits", type=int, nargs="+", default=[1024])
    parser.add_argument("--psi-sizes", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--tables", nargs="*", default=["breast-cancer", "diabetes"])
    args = parser.parse_args()
    settings = Settings(lr=0.15, l2=0.01, min_batch=16)
    tables = {"breast-cancer": breast_cancer_parties, "diabetes": diabetes_parties}
    out = {
        "lr": [
            hetero_lr(t, *tables[t](), bits, args.epochs, args.batch_size, settings)
            for t in args.tables
            for bits in args.key_bits
        ],
        "psi": [psi_cost(n) for n in args.psi_sizes],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
