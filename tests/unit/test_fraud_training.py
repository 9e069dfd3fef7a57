"""The fraud model's training: the metrics it is judged by, the fit, and the
held-out quality on the seeded synthetic set."""

from __future__ import annotations

import numpy as np
import pytest

from services.fraud import synthetic, training
from services.fraud.domain import FEATURES


def test_roc_auc_of_a_perfect_ranking_is_one_and_of_a_reversed_one_zero() -> None:
    y = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.8, 0.9])

    assert training.roc_auc(y, scores) == 1.0
    assert training.roc_auc(y, -scores) == 0.0


def test_roc_auc_counts_ties_as_half() -> None:
    y = np.array([0, 1, 0, 1])

    assert training.roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert training.roc_auc(y, np.array([0.1, 0.5, 0.5, 0.9])) == 0.875


def test_precision_and_recall_count_what_was_flagged() -> None:
    y = np.array([1, 1, 0, 0, 1])
    flagged = np.array([True, False, True, False, True])

    assert training.precision_recall(y, flagged) == pytest.approx((2 / 3, 2 / 3))


def test_the_split_holds_out_whole_users_stably() -> None:
    groups = [f"user-{i % 40}" for i in range(400)]

    held = training.split(groups)

    by_user = {g: {bool(h) for g2, h in zip(groups, held, strict=True) if g2 == g} for g in groups}
    assert all(len(sides) == 1 for sides in by_user.values())
    assert 0.1 < held.mean() < 0.4
    assert (training.split(groups) == held).all()


def test_the_fit_finds_the_feature_that_matters() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4000, len(FEATURES)))
    y = (x[:, 3] + 0.3 * rng.normal(size=4000) > 1.0).astype(np.int8)

    model = training.fit(training.Dataset(x, y, []), "t")

    assert int(np.argmax(np.abs(model.weights))) == 3
    assert training.roc_auc(y, model.probabilities(x)) > 0.95


def test_the_synthetic_set_is_the_same_for_the_same_seed() -> None:
    first = synthetic.generate(seed=11, users=100, days=5)
    second = synthetic.generate(seed=11, users=100, days=5)

    assert first == second
    assert {p for p, _, fraud in synthetic.patterns(first) if fraud} <= {
        "account_takeover", "mule", "large_transfer", "new_device_country",
    }  # fmt: skip


def test_a_model_trained_on_the_synthetic_set_ranks_held_out_fraud_above_0_97() -> None:
    """The floor, 0.97: on this set no single feature ranks fraud better than
    0.95 (measured on seeds 1 to 5: the best of them, log_amount or
    amount_vs_typical, scored 0.86 to 0.95), so passing means the model
    combines features rather than leaning on one; the fitted model scored
    0.987 to 0.999 on those seeds, so the floor leaves room for the ~60
    held-out frauds' sampling noise without letting a model that lost a
    whole pattern through."""
    trained = training.train_synthetic(seed=7, users=800, days=20)

    assert trained.metrics["test_fraud"] >= 30
    assert trained.metrics["roc_auc"] > 0.97
    assert trained.metrics["decisions"]["recall"] > 0.5
    assert trained.metrics["decisions"]["precision"] > 0.5
