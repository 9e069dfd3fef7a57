"""Training the scoring model: logistic regression fitted by Newton's method
(iteratively reweighted least squares, L2-regularised) in NumPy, measured on
a held-out split, stored in PostgreSQL as a new version.

    python -m services.fraud train [--source auto|history|synthetic] ...

``auto`` trains from the service's own labelled history (recorded decisions
with their review outcomes and reported fraud) once it holds enough fraud
and enough genuine payments, and from the seeded synthetic set before that:
the cold start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt

from services.common.db import create_pool
from services.fraud import store, synthetic
from services.fraud.config import FraudSettings
from services.fraud.domain import (
    DEFAULT_RULES,
    FEATURES,
    Decision,
    ListHits,
    Model,
    Rules,
    assess,
    features,
)

Matrix = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Dataset:
    x: Matrix  # one row per transaction, columns in FEATURES order
    y: npt.NDArray[np.int8]
    # Rows of one user stay on one side of the split: a user's own history
    # must not teach the model about the same user's held-out payments.
    groups: Sequence[str]


def fit(data: Dataset, version: str, l2: float = 1.0, iterations: int = 50) -> Model:
    """Logistic regression on standardised features."""
    mean = data.x.mean(axis=0)
    scale = data.x.std(axis=0)
    scale[scale < 1e-9] = 1.0  # a constant feature: leave it as it is
    xs = np.hstack([(data.x - mean) / scale, np.ones((len(data.x), 1))])
    y = data.y.astype(np.float64)
    w = np.zeros(xs.shape[1])
    penalty = np.full(xs.shape[1], l2)
    penalty[-1] = 0.0  # the bias is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(xs @ w, -500, 500)))
        gradient = xs.T @ (p - y) + penalty * w
        hessian = (xs * (p * (1 - p))[:, None]).T @ xs + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return Model(version, FEATURES, mean, scale, w[:-1].copy(), float(w[-1]))


def roc_auc(y: npt.NDArray[Any], scores: npt.NDArray[np.float64]) -> float:
    """The probability that a fraud scores above a genuine payment (ties
    count half): the Mann-Whitney U statistic over ranks."""
    positives = int(np.sum(y == 1))
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def precision_recall(y: npt.NDArray[Any], flagged: npt.NDArray[np.bool_]) -> tuple[float, float]:
    hits = int(np.sum(flagged & (y == 1)))
    precision = hits / int(np.sum(flagged)) if np.any(flagged) else 0.0
    recall = hits / int(np.sum(y == 1)) if np.any(y == 1) else 0.0
    return precision, recall


def split(groups: Sequence[str], test_fraction: float = 0.25) -> npt.NDArray[np.bool_]:
    """Which rows are held out: a stable quarter of the groups, by hash."""
    cut = int(test_fraction * 2**32)
    return np.array(
        [int.from_bytes(hashlib.sha256(g.encode()).digest()[:4], "big") < cut for g in groups]
    )


def synthetic_dataset(rows: Sequence[synthetic.Labelled], rules: Rules = DEFAULT_RULES) -> Dataset:
    x = np.array(
        [list(features(r.tx, r.history, r.flagged, rules).values()) for r in rows], np.float64
    )
    return Dataset(x, np.array([r.fraud for r in rows], np.int8), [str(r.tx.user_id) for r in rows])


def history_dataset(records: Sequence[Mapping[str, Any]]) -> Dataset:
    """Rows of ``store.labelled_history``: features as recorded (a feature
    recorded before it existed counts as 0)."""
    x = np.array([[float(r["features"].get(n, 0.0)) for n in FEATURES] for r in records])
    return Dataset(
        x.reshape(len(records), len(FEATURES)),
        np.array([r["label"] for r in records], np.int8),
        [str(r["user_id"]) for r in records],
    )


def model_metrics(
    model: Model, data: Dataset, rules: Rules = DEFAULT_RULES
) -> dict[str, float | None]:
    """ROC AUC of the model's probability, and its precision and recall when
    it alone flags at the review score."""
    p = model.probabilities(data.x)
    precision, recall = precision_recall(data.y, p * 100 >= rules.review_score)
    auc = roc_auc(data.y, p)
    # Without both classes held out there is no AUC (and JSON has no NaN).
    return {"roc_auc": None if math.isnan(auc) else round(auc, 4),
            "precision": round(precision, 4), "recall": round(recall, 4)}  # fmt: skip


def decision_metrics(
    rows: Sequence[synthetic.Labelled], model: Model | None, rules: Rules = DEFAULT_RULES
) -> dict[str, Any]:
    """Precision and recall of the whole verdict (lists, rules and model) at
    the rules' thresholds: REVIEW or BLOCK counts as flagged."""
    y = np.array([r.fraud for r in rows], np.int8)
    decisions = [
        assess(r.tx, r.history, ListHits(recipient_flagged=r.flagged), rules, model).decision
        for r in rows
    ]
    flagged = np.array([d >= Decision.REVIEW for d in decisions])
    blocked = np.array([d == Decision.BLOCK for d in decisions])
    precision, recall = precision_recall(y, flagged)
    return {
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "flagged_share": round(float(flagged.mean()), 4),
        "blocked_share": round(float(blocked.mean()), 4),
        "fraud_share": round(float(y.mean()), 4),
        "transactions": len(rows),
    }


def new_version(model_parameters: Mapping[str, Any], source: str) -> str:
    digest = hashlib.sha256(json.dumps(model_parameters, sort_keys=True).encode()).hexdigest()
    return f"lr-{datetime.now(UTC):%Y%m%d-%H%M%S}-{source}-{digest[:8]}"


@dataclass(frozen=True)
class Trained:
    model: Model
    metrics: dict[str, Any]
    source: str


def train_synthetic(
    seed: int = 7, users: int = 2000, days: float = 30.0, rules: Rules = DEFAULT_RULES
) -> Trained:
    rows = synthetic.generate(seed, users, days)
    data = synthetic_dataset(rows, rules)
    held = split(data.groups)
    model = _fit_and_version(Dataset(data.x[~held], data.y[~held], []), "synthetic")
    test = Dataset(data.x[held], data.y[held], [])
    metrics: dict[str, Any] = {
        **model_metrics(model, test, rules),
        "train_rows": int((~held).sum()),
        "test_rows": int(held.sum()),
        "test_fraud": int(test.y.sum()),
        "seed": seed,
        "decisions": decision_metrics(
            [r for r, h in zip(rows, held, strict=True) if h], model, rules
        ),
    }
    return Trained(model, metrics, "synthetic")


def train_history(records: Sequence[Mapping[str, Any]], rules: Rules = DEFAULT_RULES) -> Trained:
    data = history_dataset(records)
    held = split(data.groups)
    model = _fit_and_version(Dataset(data.x[~held], data.y[~held], []), "history")
    test = Dataset(data.x[held], data.y[held], [])
    metrics: dict[str, Any] = {
        **model_metrics(model, test, rules),
        "train_rows": int((~held).sum()),
        "test_rows": int(held.sum()),
        "test_fraud": int(test.y.sum()),
    }
    return Trained(model, metrics, "history")


def _fit_and_version(data: Dataset, source: str) -> Model:
    draft = fit(data, "draft")
    return Model.from_parameters(new_version(draft.parameters(), source), draft.parameters())


async def train_command(settings: FraudSettings) -> int:
    """``python -m services.fraud train``: fits, prints the held-out figures
    and stores the model; running services pick it up within seconds."""
    parser = argparse.ArgumentParser(prog="python -m services.fraud train")
    parser.add_argument("--source", choices=("auto", "history", "synthetic"), default="auto")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--users", type=int, default=2000, help="synthetic users")
    parser.add_argument("--days", type=float, default=30.0, help="synthetic days")
    parser.add_argument("--maturity-days", type=float, default=30.0,
                        help="an ALLOW this old without a fraud report counts as genuine")  # fmt: skip
    parser.add_argument("--min-fraud", type=int, default=50,
                        help="labelled frauds (and 10x genuine) needed to train on history")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print, store nothing")
    args = parser.parse_args(sys.argv[2:])
    rules = settings.rules()
    pool = await create_pool(settings.database_url("fraud"), 1, 2)
    try:
        async with pool.acquire() as conn:
            records = (
                await store.labelled_history(conn, args.maturity_days)
                if args.source != "synthetic"
                else []
            )
        frauds = sum(r["label"] for r in records)
        enough = frauds >= args.min_fraud and len(records) - frauds >= 10 * args.min_fraud
        if args.source == "history" and not enough:
            print(f"history holds {len(records)} labelled transactions ({frauds} fraud): "
                  f"too few to train on (--min-fraud {args.min_fraud})")  # fmt: skip
            return 1
        if enough and args.source != "synthetic":
            trained = train_history([dict(r) for r in records], rules)
        else:
            if args.source == "auto":
                print(f"cold start: {len(records)} labelled transactions ({frauds} fraud) in "
                      "history; training on the synthetic set")  # fmt: skip
            trained = train_synthetic(args.seed, args.users, args.days, rules)
        print_report(trained)
        if not args.dry_run:
            async with pool.acquire() as conn:
                await store.insert_model(conn, trained.model, trained.metrics, trained.source)
            print(f"stored {trained.model.version}")
    finally:
        await pool.close()
    return 0


def print_report(trained: Trained) -> None:
    m = trained.metrics
    print(f"model    {trained.model.version}")
    print(f"trained  on {trained.source}: {m['train_rows']} rows; held out {m['test_rows']} "
          f"({m['test_fraud']} fraud)")  # fmt: skip
    auc = "n/a (one class held out)" if m["roc_auc"] is None else f"{m['roc_auc']:.4f}"
    print(f"model    ROC AUC {auc}  precision {m['precision']:.4f}  "
          f"recall {m['recall']:.4f}  (model alone, flagging at the review score)")  # fmt: skip
    if "decisions" in m:
        d = m["decisions"]
        print(f"verdicts precision {d['precision']:.4f}  recall {d['recall']:.4f}  "
              f"(rules and model at the default thresholds; {d['flagged_share']:.2%} flagged)")  # fmt: skip
    weights = {n: round(float(w), 3)
               for n, w in zip(trained.model.feature_names, trained.model.weights, strict=True)}  # fmt: skip
    print(f"weights  {weights}")
