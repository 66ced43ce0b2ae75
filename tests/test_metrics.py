"""Retrieval mAP (conventional and tie-aware), radius metrics, PR curve, accuracy and OOD metrics."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from hashdistill import codes
from hashdistill.codes import UNKNOWN, pack_codes
from hashdistill.errors import UserError
from hashdistill.metrics import classification_accuracy, ood_exact_match, ood_msp_baseline, retrieval_metrics


def reference_ap(dist: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Textbook AP@K: stable sort by distance, mean precision@i over relevant items in the top k."""
    order = np.argsort(dist, kind="stable")[:k]
    hits, total = 0, 0.0
    for i, item in enumerate(order, start=1):
        if relevant[item]:
            hits += 1
            total += hits / i
    return total / hits if hits else 0.0


def sign_distances(q_signs: np.ndarray, db_signs: np.ndarray) -> np.ndarray:
    return (q_signs[:, None, :] != db_signs[None, :, :]).sum(axis=-1)


def case_strategy(max_queries: int = 4, max_db: int = 12, max_bits: int = 6, max_labels: int = 3):
    """(q_signs, q_labels, db_signs, db_labels, top_k) with few bits, hence many ties."""

    @st.composite
    def build(draw):
        bits = draw(st.integers(1, max_bits))
        n, m = draw(st.integers(1, max_queries)), draw(st.integers(1, max_db))
        signs = st.sampled_from([-1, 1])
        labels = st.integers(0, max_labels - 1)
        q = draw(arrays(np.int8, (n, bits), elements=signs))
        db = draw(arrays(np.int8, (m, bits), elements=signs))
        ql = draw(arrays(np.int64, n, elements=labels))
        dl = draw(arrays(np.int64, m, elements=labels))
        top_k = draw(st.one_of(st.none(), st.integers(1, m + 2)))
        return q, ql, db, dl, top_k

    return build()


def run(q, ql, db, dl, top_k=None, radius=2):
    return retrieval_metrics(pack_codes(q), ql, pack_codes(db), dl, q.shape[1], top_k=top_k, radius=radius)


# The hand-computed example: query (+1, +1) against four 2-bit codes at distances 0, 1, 1, 2.
Q = np.array([[1, 1]])
DB = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]])


def test_hand_example_full_ranking():
    res = run(Q, np.array([0]), DB, np.array([0, 1, 0, 1]), radius=0)
    assert res["map"] == pytest.approx((1 / 1 + 2 / 3) / 2)  # relevant at ranks 1 and 3
    # the tied pair at distance 1 is (non-relevant, relevant): relevant at rank 2 or 3, each with prob 1/2
    assert res["map_tie_aware"] == pytest.approx(0.5 * (1 + 2 / 2) / 2 + 0.5 * (1 + 2 / 3) / 2)
    assert res["precision_at_radius"] == pytest.approx(1.0)
    assert res["recall_at_radius"] == pytest.approx(0.5)
    assert res["pr_curve"]["radius"] == [0, 1, 2]
    assert res["pr_curve"]["precision"] == pytest.approx([1, 2 / 3, 2 / 4])
    assert res["pr_curve"]["recall"] == pytest.approx([0.5, 1, 1])


def test_hand_example_cutoff_inside_tie_group():
    labels = np.array([1, 0, 1, 0])  # relevant: item 1 (distance 1) and item 3 (distance 2)
    res = run(Q, np.array([0]), DB, labels, top_k=2)
    assert res["map"] == pytest.approx(0.5)  # top 2 = items 0, 1: one relevant at rank 2
    # K=2 cuts the tie group {1, 2}: the relevant item lands in the top 2 with prob 1/2 (AP 1/2), else
    # nothing relevant is retrieved (AP 0)
    assert res["map_tie_aware"] == pytest.approx(0.25)
    full = run(Q, np.array([0]), DB, labels)
    assert full["map"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert full["map_tie_aware"] == pytest.approx(0.5 * (1 / 2 + 2 / 4) / 2 + 0.5 * (1 / 3 + 2 / 4) / 2)


def test_last_database_item_counts():
    """No [0:-1] slice: a relevant item ranked last still contributes."""
    q = np.array([[1, 1, 1]])
    db = np.array([[1, 1, 1], [1, 1, -1], [1, -1, -1], [-1, -1, -1]])  # distances 0, 1, 2, 3
    res = run(q, np.array([0]), db, np.array([1, 1, 1, 0]))
    assert res["map"] == pytest.approx(1 / 4)
    assert res["map_tie_aware"] == pytest.approx(1 / 4)  # no ties: identical


def test_no_item_within_radius_scores_zero():
    q = np.array([[1, 1, 1, 1], [-1, -1, -1, -1]])
    db = np.array([[-1, -1, -1, -1], [-1, -1, -1, 1]])  # query 0 is 3-4 bits away from everything
    res = run(q, np.array([0, 0]), db, np.array([0, 1]), radius=2)
    # query 0: nothing within radius 2 -> precision 0, recall 0; query 1: 2 items, 1 relevant
    assert res["precision_at_radius"] == pytest.approx((0 + 1 / 2) / 2)
    assert res["recall_at_radius"] == pytest.approx((0 + 1) / 2)


def test_query_without_relevant_items_has_ap_zero():
    res = run(Q, np.array([7]), DB, np.array([0, 1, 0, 1]))
    assert res["map"] == 0.0 and res["map_tie_aware"] == 0.0 and res["recall_at_radius"] == 0.0


@settings(max_examples=150, deadline=None)
@given(case_strategy())
def test_conventional_map_matches_reference(case):
    q, ql, db, dl, top_k = case
    res = run(q, ql, db, dl, top_k=top_k)
    k = len(db) if top_k is None else min(top_k, len(db))
    dist = sign_distances(q, db)
    expected = np.mean([reference_ap(dist[i], dl == ql[i], k) for i in range(len(q))])
    assert res["map"] == pytest.approx(expected, abs=1e-12)
    assert res["top_k"] == k


@settings(max_examples=60, deadline=None)
@given(case_strategy(max_queries=3, max_db=6))
def test_tie_aware_map_is_exact_expectation_over_orders(case):
    """Average the conventional AP over every permutation of the database (all orders within ties)."""
    q, ql, db, dl, top_k = case
    res = run(q, ql, db, dl, top_k=top_k)
    k = len(db) if top_k is None else min(top_k, len(db))
    dist = sign_distances(q, db)
    perms = [np.array(p) for p in itertools.permutations(range(len(db)))]
    expected = np.mean(
        [np.mean([reference_ap(dist[i][p], (dl == ql[i])[p], k) for p in perms]) for i in range(len(q))]
    )
    assert res["map_tie_aware"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("top_k", [None, 7, 40])
def test_tie_aware_map_matches_monte_carlo(top_k):
    rng = np.random.default_rng(3)
    q, db = rng.choice([-1, 1], (5, 4)), rng.choice([-1, 1], (60, 4))  # 4 bits, 60 items: big tie groups
    ql, dl = rng.integers(0, 3, 5), rng.integers(0, 3, 60)
    res = run(q, ql, db, dl, top_k=top_k)
    k = 60 if top_k is None else top_k
    dist = sign_distances(q, db)
    samples = []
    for _ in range(2000):
        p = rng.permutation(60)
        samples.append(np.mean([reference_ap(dist[i][p], (dl == ql[i])[p], k) for i in range(5)]))
    stderr = np.std(samples) / np.sqrt(len(samples))
    assert abs(res["map_tie_aware"] - np.mean(samples)) < 4 * stderr + 1e-9
    assert abs(res["map"] - res["map_tie_aware"]) > 1e-6  # ties do matter here


@settings(max_examples=80, deadline=None)
@given(case_strategy(), st.integers(0, 7))
def test_radius_metrics_and_pr_curve_match_brute_force(case, radius):
    q, ql, db, dl, _ = case
    bits = q.shape[1]
    res = run(q, ql, db, dl, radius=radius)
    dist = sign_distances(q, db)
    relevant = dl[None, :] == ql[:, None]
    within = dist <= radius
    prec = [
        (within[i] & relevant[i]).sum() / within[i].sum() if within[i].any() else 0 for i in range(len(q))
    ]
    rec = [
        (within[i] & relevant[i]).sum() / relevant[i].sum() if relevant[i].any() else 0 for i in range(len(q))
    ]
    assert res["precision_at_radius"] == pytest.approx(np.mean(prec))
    assert res["recall_at_radius"] == pytest.approx(np.mean(rec))
    for r in range(bits + 1):
        hits, retrieved = ((dist <= r) & relevant).sum(), (dist <= r).sum()
        assert res["pr_curve"]["precision"][r] == pytest.approx(hits / retrieved if retrieved else 0)
        assert res["pr_curve"]["recall"][r] == pytest.approx(hits / relevant.sum() if relevant.any() else 0)


def test_chunking_does_not_change_results(monkeypatch):
    rng = np.random.default_rng(5)
    q, db = rng.standard_normal((37, 9)), rng.standard_normal((50, 9))
    ql, dl = rng.integers(0, 4, 37), rng.integers(0, 4, 50)
    whole = run(q, ql, db, dl, top_k=20)
    monkeypatch.setattr(codes, "_CHUNK_WORDS", 50 * 3)  # 3 queries per block
    assert run(q, ql, db, dl, top_k=20) == whole


def test_string_labels_and_top_k_beyond_database():
    res = run(Q, np.array(["cat"]), DB, np.array(["cat", "dog", "cat", "dog"]), top_k=100)
    assert res["top_k"] == 4 and res["map"] == pytest.approx(5 / 6)


def test_retrieval_input_errors():
    q, db = pack_codes(Q), pack_codes(DB)
    with pytest.raises(UserError, match="shape"):
        retrieval_metrics(q, [0], db, [0, 1, 0, 1], bits=16)  # 2-bit codes take 1 byte, 16-bit take 2
    with pytest.raises(UserError, match="labels"):
        retrieval_metrics(q, [0], db, [0, 1], bits=2)
    with pytest.raises(UserError, match="top_k"):
        retrieval_metrics(q, [0], db, [0, 1, 0, 1], bits=2, top_k=0)
    with pytest.raises(UserError, match="radius"):
        retrieval_metrics(q, [0], db, [0, 1, 0, 1], bits=2, radius=-1)


def test_classification_accuracy_counts_unknown_as_wrong():
    assert classification_accuracy(np.array([0, UNKNOWN, 2, 1]), np.array([0, 1, 2, 2])) == 0.5
    with pytest.raises(UserError):
        classification_accuracy(np.array([0, 1]), np.array([0]))


def test_ood_exact_match():
    classes = pack_codes(np.array([[1, 1, 1, 1], [-1, -1, -1, -1]]))
    id_codes = pack_codes(np.array([[1, 1, 1, 1], [-1, -1, -1, -1], [1, 1, 1, -1]]))  # last: 1 bit off
    ood_codes = pack_codes(np.array([[1, 1, -1, -1], [1, 1, 1, 1]]))  # 2 bits off, and an exact match
    res = ood_exact_match(id_codes, ood_codes, classes)
    assert res["tpr"] == pytest.approx(1 / 2)
    assert res["fpr"] == pytest.approx(1 / 3)
    # scores: ID [0, 0, 1], OOD [2, 0]; P(OOD score > ID score) + ties/2 = (3 + 0.5 * 2) / 6
    assert res["auroc"] == pytest.approx(4 / 6)
    with pytest.raises(UserError):
        ood_exact_match(id_codes, ood_codes[:0], classes)


def _two_class_logits(max_probs):
    """Logits whose softmax is [p, 1 - p], so -log(max softmax) = -log(p) for p >= 0.5."""
    p = np.asarray(max_probs, dtype=float)
    return np.log(np.stack([p, 1 - p], axis=1))


def test_ood_msp_baseline_tunes_on_validation_only():
    val_id, val_ood = _two_class_logits([0.9, 0.8]), _two_class_logits([0.5, 0.6])
    test_id, test_ood = _two_class_logits([0.95, 0.55, 0.7]), _two_class_logits([0.5, 0.65])
    res = ood_msp_baseline(val_id, val_ood, test_id, test_ood)
    assert res["max_prob_threshold"] == pytest.approx(0.6)  # J = 1 when MSP <= 0.6 (the strictest such rule)
    assert res["tpr"] == pytest.approx(1 / 2)
    assert res["fpr"] == pytest.approx(1 / 3)
    assert res["youden_j"] == pytest.approx(1 / 2 - 1 / 3)
    assert res["auroc"] == pytest.approx(5 / 6)  # test scores only: 5 of 6 (OOD, ID) pairs ordered
    assert res["ood_samples_used"] == 2
    assert "samples_to_match_exact_match" not in res  # only with an exact-match result to compare against
    # J ties at 0.5 between MSP 0.7 and MSP 0.5 (scores -log 0.7 and -log 0.5): the strictest rule wins
    tie = ood_msp_baseline(_two_class_logits([0.9, 0.6]), _two_class_logits([0.7, 0.5]), test_id, test_ood)
    assert tie["max_prob_threshold"] == pytest.approx(0.5) and tie["val_youden_j"] == pytest.approx(0.5)
    with pytest.raises(UserError):
        ood_msp_baseline(val_id, val_ood, test_id, np.zeros((2, 3)))
    with pytest.raises(UserError):
        ood_msp_baseline(val_id, val_ood, test_id, np.full((2, 2), np.nan))


def test_ood_msp_baseline_ranks_inputs_float32_softmax_would_tie():
    # Margins of 40 and 50 nats both give max softmax == 1.0 in float32 (and 40+ in float64):
    # the -log(MSP) score keeps them apart, so the baseline can still separate ID from OOD.
    def margin(values):
        return np.stack([np.asarray(values, dtype=float), np.zeros(len(values))], axis=1)

    ident, ood = margin([50.0, 52.0, 55.0]), margin([40.0, 41.0])
    res = ood_msp_baseline(ident, ood, ident, ood)
    assert (res["tpr"], res["fpr"], res["auroc"]) == (1.0, 0.0, 1.0)


def test_ood_msp_baseline_compares_with_exact_match():
    rng = np.random.default_rng(0)
    val_id, test_id = _two_class_logits(rng.uniform(0.7, 1.0, 400)), _two_class_logits(rng.uniform(0.7, 1.0, 400))
    val_ood, test_ood = _two_class_logits(rng.uniform(0.5, 0.8, 400)), _two_class_logits(rng.uniform(0.5, 0.8, 400))

    def compare(exact_j, exact_fpr=0.0):
        return ood_msp_baseline(val_id, val_ood, test_id, test_ood, {"youden_j": exact_j, "fpr": exact_fpr})

    weak, strong = compare(-1.0), compare(1.01)
    assert weak["samples_to_match_exact_match"] == 2  # any tuned threshold beats a detector with J = -1
    assert strong["samples_to_match_exact_match"] is None  # no threshold reaches J > 1
    sizes, mean_j = zip(*weak["tuning_curve"])
    assert sizes[0] == 2 and sizes[-1] == 800  # the last point: every held-out sample
    assert mean_j[-1] == pytest.approx(weak["youden_j"])
    assert mean_j[-1] > mean_j[0]  # more tuning samples, a better threshold
    # MSP in [0.7, 0.8] is ambiguous; at zero FPR (MSP < 0.7 only) the OOD inputs caught are those below 0.7
    assert compare(0.0, 0.0)["tpr_at_exact_match_fpr"] == pytest.approx(np.mean(test_ood[:, 0] < np.log(0.7)),
                                                                       abs=0.01)


def test_tie_aware_map_is_the_headline_and_does_not_depend_on_database_order():
    """The conventional mAP moves when the database is shuffled (ties by index); the tie-aware one must not."""
    rng = np.random.default_rng(5)
    q, db = rng.choice([-1, 1], (8, 4)), rng.choice([-1, 1], (80, 4))
    ql, dl = rng.integers(0, 3, 8), rng.integers(0, 3, 80)
    conventional, tie_aware = set(), set()
    for seed in range(6):
        order = np.random.default_rng(seed).permutation(80)
        res = run(q, ql, db[order], dl[order])
        assert next(iter(res)) == "map_tie_aware"  # the first figure is the headline
        conventional.add(round(res["map"], 9))
        tie_aware.add(round(res["map_tie_aware"], 9))
    assert len(tie_aware) == 1 and len(conventional) > 1


def test_tie_aware_ap_of_one_tie_group_by_hand():
    """McSherry & Najork's rule on a case small enough to enumerate: 3 items tie at distance 0, 1 relevant, behind
    them 1 relevant item alone at distance 2. The relevant tied item sits at rank 1, 2 or 3 (prob 1/3 each); the
    lone one is at rank 4 with 2 relevant above or at it."""
    q = np.array([[1, 1]])
    db = np.array([[1, 1], [1, 1], [1, 1], [-1, -1]])
    res = run(q, np.array([0]), db, np.array([0, 1, 1, 0]))
    expected = np.mean([(1 / r + 2 / 4) / 2 for r in (1, 2, 3)])
    assert res["map_tie_aware"] == pytest.approx(expected, abs=1e-12)
    assert res["map"] == pytest.approx((1 + 2 / 4) / 2)  # ties by index: the relevant tied item is first


def test_reranked_map_by_hand():
    """<z, b> with z = (1, 2) ranks (+1, +1) = 3, (-1, +1) = 1, (+1, -1) = -1, (-1, -1) = -3: both relevant items
    first (AP 1), where Hamming ranking ties the two codes at distance 1 (AP 11/12 in expectation); z = (2, 1)
    puts the non-relevant one first (AP (1 + 2/3) / 2)."""
    labels = np.array([0, 1, 0, 1])
    first = retrieval_metrics(pack_codes(Q), np.array([0]), pack_codes(DB), labels, 2,
                              query_logits=np.array([[1.0, 2.0]]))
    assert first["map_reranked"] == pytest.approx(1.0)
    assert first["map_tie_aware"] == pytest.approx(11 / 12)
    second = retrieval_metrics(pack_codes(Q), np.array([0]), pack_codes(DB), labels, 2,
                               query_logits=np.array([[2.0, 1.0]]))
    assert second["map_reranked"] == pytest.approx((1 + 2 / 3) / 2)


def test_reranked_map_counts_equal_codes_as_ties():
    """Equal database codes get equal scores whatever z is: two copies of the nearest code, one relevant, give
    the tie-aware AP 0.5 * 1 + 0.5 * 1/2 = 0.75, not the 1 or 1/2 of one order."""
    db = np.array([[1, -1], [1, -1], [-1, -1]])
    res = retrieval_metrics(pack_codes(Q), np.array([0]), pack_codes(db), np.array([1, 0, 1]), 2,
                            query_logits=np.array([[0.3, 0.7]]))
    assert res["map_reranked"] == pytest.approx(0.75)


@given(case_strategy())
@settings(max_examples=40, deadline=None)
def test_reranked_map_with_sign_logits_is_the_tie_aware_map(case):
    """z = sign(code) gives <z, b> = bits - 2 * Hamming distance: the same groups, the same figure."""
    q, ql, db, dl, top_k = case
    res = retrieval_metrics(pack_codes(q), ql, pack_codes(db), dl, q.shape[1], top_k=top_k,
                            query_logits=q.astype(np.float64))
    assert res["map_reranked"] == pytest.approx(res["map_tie_aware"], abs=1e-12)


def test_reranked_map_matches_brute_force_without_ties():
    """Distinct codes and generic z: no ties, so the re-ranked mAP is the textbook AP of the score order."""
    rng = np.random.default_rng(3)
    bits = 8
    db = np.array([[1 if (i >> b) & 1 else -1 for b in range(bits)] for i in range(2**bits)])
    dl, ql = rng.integers(0, 3, len(db)), rng.integers(0, 3, 5)
    z = rng.standard_normal((5, bits))
    res = retrieval_metrics(pack_codes(z), ql, pack_codes(db), dl, bits, top_k=40, query_logits=z)
    expected = np.mean([reference_ap(-(db @ z[i]), dl == ql[i], 40) for i in range(5)])
    assert res["map_reranked"] == pytest.approx(expected, abs=1e-12)
