"""Retrieval, classification and OOD metrics over packed binary codes (numpy; sklearn for AUROC).

Retrieval ranks the database by Hamming distance. Relevant = same label as the query (single-label).

- ``map_tie_aware`` (the headline mAP): the expectation of AP@K when the order inside each group of
  equal distance is uniformly random (McSherry & Najork, "Computing information retrieval performance
  measures efficiently in the presence of tied scores", ECIR 2008). The normalisation is the random
  number of relevant items in the top K, not its expectation: if K cuts a tie group, the expectation
  runs over the hypergeometric count of relevant items that land above the cut. It does not depend on
  the order of the database.
- ``map``: conventional mAP@K, order-dependent. The database is ranked by distance with ties broken by
  database index (stable sort); AP is the mean of precision@i over the relevant items in the top K,
  normalised by the number of relevant items retrieved in the top K; a query with none there scores 0.
  Every database item counts (no ``[0:-1]`` slice). With few bits most neighbours tie, so shuffling
  the database moves this figure; without ties it equals ``map_tie_aware``.
- ``map_reranked`` (given the queries' float logits z_q): the tie-aware mAP of the database ranked by the
  asymmetric score <z_q, b>, b in {-1, +1}^k the database codes (DESIGN.md "Ties"): it breaks Hamming ties
  without retraining. Items with equal codes keep equal scores, so ties remain and the same tie-aware rule
  counts them (exactly: scores are computed once per distinct code).
- ``map`` equals DeepHash-pytorch's ``CalcTopMap`` only when that code's ties also break by database
  index; its own ``np.argsort`` is not stable and, at 4 bits, moves the figure by up to 0.58 points.
- ``precision_at_radius`` / ``recall_at_radius``: per-query precision and recall among database items
  within Hamming distance <= radius, averaged over queries (macro: every query weighs the same). A
  query with no item within the radius has precision 0 (HashNet's convention); a query with no
  relevant item in the database has recall 0.
- ``pr_curve``: precision and recall at every radius 0..k, pooled over queries (micro: counts summed
  over queries, so a query that retrieves many items weighs more; precision 0 where nothing at all is
  retrieved). Its point at radius 2 is therefore not ``precision_at_radius``: the two answer different
  questions and both are labelled so wherever they are shown.

Hamming distances are small integers, so per query a histogram of relevant/total counts per distance
gives the tie-aware AP in O(k) with harmonic numbers; the conventional AP needs one stable argsort
(radix sort on uint16). Queries are processed in chunks: the n x m distance matrix is never held.
"""

import numpy as np

from hashdistill.codes import UNKNOWN, iter_hamming_rows, packed_width, unpack_codes
from hashdistill.errors import UserError


def retrieval_metrics(
    query_codes: np.ndarray,
    query_labels: np.ndarray,
    db_codes: np.ndarray,
    db_labels: np.ndarray,
    bits: int,
    top_k: int | None = None,
    radius: int = 2,
    query_logits: np.ndarray | None = None,
) -> dict:
    """mAP@K (tie-aware, the headline, and conventional), precision/recall within a radius and the PR curve.

    Codes are packed uint8 (see :mod:`hashdistill.codes`); ``top_k=None`` ranks the whole database.
    ``query_logits`` (n, bits): the queries' float logits; given, ``map_reranked`` is added.
    """
    width = packed_width(bits)
    for name, codes in (("query_codes", query_codes), ("db_codes", db_codes)):
        shape = np.shape(codes)
        if len(shape) != 2 or shape[1] != width:
            raise UserError(f"{name} must have shape (n, {width}) for {bits}-bit codes, got {shape}")
    q_lab, db_lab = _encode_labels(query_labels, len(query_codes), db_labels, len(db_codes))
    n, m = len(q_lab), len(db_lab)
    if n == 0 or m == 0:
        raise UserError(f"retrieval needs queries and a database, got {n} queries and {m} items")
    if top_k is not None and (int(top_k) != top_k or top_k < 1):
        raise UserError(f"top_k must be a positive integer or None, got {top_k!r}")
    if int(radius) != radius or radius < 0:
        raise UserError(f"radius must be a non-negative integer, got {radius!r}")
    cutoff = m if top_k is None else min(int(top_k), m)
    tables = _Tables(m)

    ap = np.empty(n)
    ap_tie = np.empty(n)
    prec_radius = np.empty(n)
    rec_radius = np.empty(n)
    cum_rel_total = np.zeros(bits + 1)
    cum_tot_total = np.zeros(bits + 1)
    relevant_total = 0
    for start, dist in iter_hamming_rows(query_codes, db_codes):
        rows = slice(start, start + len(dist))
        relevant = db_lab[None, :] == q_lab[rows, None]
        ap[rows], cum_rel, cum_tot = _rank_block(dist, relevant, cutoff, bits)
        rel_hist = np.diff(cum_rel, axis=1, prepend=0)
        tot_hist = np.diff(cum_tot, axis=1, prepend=0)
        ap_tie[rows] = _tie_aware_ap(rel_hist, tot_hist, cutoff, tables)
        n_relevant = cum_rel[:, -1]
        at = min(int(radius), bits)
        prec_radius[rows] = _ratio(cum_rel[:, at], cum_tot[:, at])
        rec_radius[rows] = _ratio(cum_rel[:, at], n_relevant)
        cum_rel_total += cum_rel.sum(axis=0)
        cum_tot_total += cum_tot.sum(axis=0)
        relevant_total += int(n_relevant.sum())

    result = {
        "map_tie_aware": float(ap_tie.mean()),
        "map": float(ap.mean()),
        "precision_at_radius": float(prec_radius.mean()),
        "recall_at_radius": float(rec_radius.mean()),
        "radius": int(radius),
        "top_k": cutoff,
        "bits": int(bits),
        "n_queries": n,
        "n_database": m,
        "pr_curve": {
            "radius": list(range(bits + 1)),
            "precision": _ratio(cum_rel_total, cum_tot_total).tolist(),
            "recall": _ratio(cum_rel_total, np.full(bits + 1, relevant_total)).tolist(),
        },
    }
    if query_logits is not None:
        result["map_reranked"] = _reranked_map(query_logits, q_lab, db_codes, db_lab, bits, cutoff, tables)
    return result


def _reranked_map(query_logits: np.ndarray, q_lab: np.ndarray, db_codes: np.ndarray, db_lab: np.ndarray,
                  bits: int, cutoff: int, tables: "_Tables") -> float:
    """Tie-aware mAP@K of the database ranked by <z_q, b>, highest first.

    The score depends on b alone, so it is computed once per distinct database code (equal codes get bitwise
    equal scores: they tie, as they must); per query the distinct codes are sorted by score, runs of equal
    scores merged, and the relevant / total counts of each run go to :func:`_tie_aware_ap`.
    """
    z = np.asarray(query_logits, dtype=np.float64)
    if z.shape != (len(q_lab), bits) or not np.isfinite(z).all():
        raise UserError(f"query_logits must be finite, of shape ({len(q_lab)}, {bits}), got {z.shape}")
    unique, code_of = np.unique(db_codes, axis=0, return_inverse=True)
    signs = unpack_codes(unique, bits).astype(np.float64)
    u, n_labels = len(unique), int(max(q_lab.max(), db_lab.max())) + 1
    per_code = np.zeros((u, n_labels), dtype=np.int64)
    np.add.at(per_code, (code_of.ravel(), db_lab), 1)
    tot_code = per_code.sum(axis=1)
    ap = np.empty(len(z))
    chunk = max(1, (1 << 22) // max(u, 1))
    for start in range(0, len(z), chunk):
        rows = slice(start, start + chunk)
        scores = z[rows] @ signs.T
        order = np.argsort(-scores, axis=1, kind="stable")
        ranked = np.take_along_axis(scores, order, axis=1)
        rel = per_code[order, q_lab[rows, None]]
        new_run = np.ones(ranked.shape, dtype=bool)
        new_run[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
        run = np.cumsum(new_run, axis=1) - 1 + (np.arange(len(ranked)) * u)[:, None]
        size = len(ranked) * u
        rel_hist = np.bincount(run.ravel(), weights=rel.ravel(), minlength=size).reshape(len(ranked), u)
        tot_hist = np.bincount(run.ravel(), weights=tot_code[order].ravel(), minlength=size).reshape(len(ranked), u)
        ap[rows] = _tie_aware_ap(rel_hist.astype(np.int64), tot_hist.astype(np.int64), cutoff, tables)
    return float(ap.mean())


def classification_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of correct predictions; UNKNOWN (-1, from exact decoding) always counts as wrong."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape or pred.ndim != 1 or len(pred) == 0:
        raise UserError(
            f"pred and labels must be equal-length non-empty 1-D arrays, got {pred.shape} and {labels.shape}"
        )
    if (labels == UNKNOWN).any():
        raise UserError(f"labels must not contain the UNKNOWN marker {UNKNOWN}")
    return float(np.mean(pred == labels))


def ood_exact_match(id_codes: np.ndarray, ood_codes: np.ndarray, class_codes: np.ndarray) -> dict:
    """LLC's threshold-free OOD rule: flag codes that match no class code exactly.

    TPR = fraction of OOD inputs flagged, FPR = fraction of in-distribution inputs flagged. AUROC
    scores each input by its minimum Hamming distance to any class code (OOD is the positive class).
    """
    from sklearn.metrics import roc_auc_score

    id_dist = _min_class_distance(id_codes, class_codes, "id_codes")
    ood_dist = _min_class_distance(ood_codes, class_codes, "ood_codes")
    scores = np.concatenate([id_dist, ood_dist])
    is_ood = np.concatenate([np.zeros(len(id_dist)), np.ones(len(ood_dist))])
    tpr, fpr = float(np.mean(ood_dist > 0)), float(np.mean(id_dist > 0))
    return {"tpr": tpr, "fpr": fpr, "youden_j": tpr - fpr, "auroc": float(roc_auc_score(is_ood, scores)),
            "n_id": len(id_dist), "n_ood": len(ood_dist)}


TUNING_SAMPLE_SIZES = (2, 4, 6, 10, 20, 40, 100, 200, 400, 1000, 2000, 4000, 10000)


def ood_msp_baseline(val_id_logits: np.ndarray, val_ood_logits: np.ndarray, test_id_logits: np.ndarray,
                     test_ood_logits: np.ndarray, exact_match: dict | None = None, draws: int = 50,
                     seed: int = 0) -> dict:
    """Max-softmax-probability baseline on class logits, its threshold tuned on held-out samples.

    The score is -log(max softmax) = log1p(sum_{j != top} exp(l_j - l_top)) in float64: the same
    ranking as 1 - MSP, without the float32 softmax rounding confident inputs to exactly 1.0 (which
    would tie most of them and hand the baseline a coarse threshold). The threshold maximises
    Youden's J = TPR - FPR on the held-out ID/OOD sets (ties: the highest); an input is flagged when
    its score is >= the threshold, i.e. when its MSP <= ``max_prob_threshold``.

    Unlike exact matching the baseline needs OOD samples. Given ``exact_match`` (from
    :func:`ood_exact_match` on the same test sets) it also reports the baseline's TPR at exact
    match's FPR, and how many held-out samples (half ID, half OOD, ``draws`` random draws each; the
    last point uses them all) its threshold needs before its mean test J reaches exact match's:
    ``None`` when it never does.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    sets = [val_id_logits, val_ood_logits, test_id_logits, test_ood_logits]
    names = ["val_id_logits", "val_ood_logits", "test_id_logits", "test_ood_logits"]
    val_id, val_ood, test_id, test_ood = (_msp_score(z, name) for z, name in zip(sets, names))
    if len({np.shape(z)[1] for z in sets}) != 1:
        raise UserError(f"all logit arrays must have the same number of classes, got {[np.shape(z) for z in sets]}")

    threshold, val_j = _youden_threshold(val_id, val_ood)
    sorted_test = np.sort(test_id), np.sort(test_ood)
    scores = np.concatenate([test_id, test_ood])
    is_ood = np.concatenate([np.zeros(len(test_id)), np.ones(len(test_ood))])
    tpr, fpr = float(np.mean(test_ood >= threshold)), float(np.mean(test_id >= threshold))
    result = {"max_prob_threshold": float(np.exp(-threshold)), "tpr": tpr, "fpr": fpr, "youden_j": tpr - fpr,
              "auroc": float(roc_auc_score(is_ood, scores)), "val_youden_j": val_j,
              "ood_samples_used": len(val_ood), "id_samples_used": len(val_id)}
    if exact_match is not None:
        roc_fpr, roc_tpr, _ = roc_curve(is_ood, scores)
        result["tpr_at_exact_match_fpr"] = float(np.interp(exact_match["fpr"], roc_fpr, roc_tpr))
        rng = np.random.default_rng(seed)
        curve = []
        for n in (n for n in TUNING_SAMPLE_SIZES if n // 2 <= min(len(val_id), len(val_ood))):
            draws_j = [_youden_at(*sorted_test, _youden_threshold(rng.choice(val_id, n // 2, replace=False),
                                                                  rng.choice(val_ood, n // 2, replace=False))[0])
                       for _ in range(draws)]
            curve.append([n, float(np.mean(draws_j))])
        curve.append([len(val_id) + len(val_ood), tpr - fpr])  # the threshold tuned on every held-out sample
        result["tuning_curve"] = curve
        result["samples_to_match_exact_match"] = next((n for n, j in curve if j >= exact_match["youden_j"]), None)
    return result


def _youden_threshold(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[float, float]:
    """The highest score threshold that maximises TPR - FPR on these samples, and that maximum."""
    candidates = np.unique(np.concatenate([id_scores, ood_scores]))
    j = _youden_at(np.sort(id_scores), np.sort(ood_scores), candidates)
    best = np.flatnonzero(j == j.max())[-1]
    return float(candidates[best]), float(j[best])


def _youden_at(sorted_id: np.ndarray, sorted_ood: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """J(t) = P(OOD score >= t) - P(ID score >= t), vectorised over thresholds."""
    tpr = 1.0 - np.searchsorted(sorted_ood, thresholds, side="left") / len(sorted_ood)
    fpr = 1.0 - np.searchsorted(sorted_id, thresholds, side="left") / len(sorted_id)
    return tpr - fpr


class _Tables:
    """Harmonic numbers H[0..m] and log-factorials log(i!) for i in 0..m, shared by all chunks."""

    def __init__(self, m: int) -> None:
        i = np.arange(1, m + 1, dtype=np.float64)
        self.harmonic = np.concatenate([[0.0], np.cumsum(1.0 / i)])
        self.log_factorial = np.concatenate([[0.0], np.cumsum(np.log(i))])

    def log_choose(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        lf = self.log_factorial
        return lf[a] - lf[b] - lf[a - b]


def _rank_block(
    dist: np.ndarray, relevant: np.ndarray, cutoff: int, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Conventional AP@K and counts of relevant / all items within each distance 0..bits, per query.

    Sorting the unique keys ``dist * 2m + 2 * index + relevant`` ranks the database by distance with
    ties by index and carries relevance in the lowest bit, so no gather through an argsort is needed.
    AP@K = (1/R_K) * sum over the r-th relevant item in the top K of r / its position.
    """
    n, m = dist.shape
    dtype = np.uint32 if 2 * m * (bits + 1) <= np.iinfo(np.uint32).max else np.uint64
    keys = np.multiply(dist, 2 * m, dtype=dtype)
    keys += (2 * np.arange(m)).astype(dtype)
    keys += relevant
    keys.sort(axis=1)
    flat = np.flatnonzero((keys & 1).astype(bool))  # relevant items, by query then rank
    row_starts = np.arange(n) * m
    per_row = np.diff(np.searchsorted(flat, row_starts), append=len(flat))
    rows = np.repeat(np.arange(n), per_row)
    pos = flat - np.repeat(row_starts, per_row)

    top = pos < cutoff
    rows_k, pos_k = rows[top], pos[top]
    n_found = np.bincount(rows_k, minlength=n)
    rank = np.arange(len(rows_k)) - (np.cumsum(n_found) - n_found)[rows_k] + 1
    ap = _ratio(np.bincount(rows_k, weights=rank / (pos_k + 1), minlength=n), n_found)

    bounds = (np.arange(1, bits + 2) * 2 * m).astype(dtype)  # distance <= d  <=>  key < (d + 1) * 2m
    cum_tot = np.stack([np.searchsorted(row, bounds) for row in keys])
    cum_rel = np.searchsorted(flat, row_starts[:, None] + cum_tot) - (np.cumsum(per_row) - per_row)[:, None]
    return ap, cum_rel, cum_tot


def _expected_precision_sum(
    before: np.ndarray, rel_before: np.ndarray, n: np.ndarray, r: np.ndarray, tables: _Tables
) -> np.ndarray:
    """E[sum of precision@i over the r relevant items] when n tied items fill positions before+1..before+n.

    Position t of the group is relevant with probability r/n, and then holds precision
    (rel_before + 1 + (t-1)(r-1)/(n-1)) / (before + t). Summing over t with harmonic numbers:
    (r/n) * [(rel_before + 1) dH + (r-1)/(n-1) * (n - (before + 1) dH)], dH = H[before+n] - H[before].
    """
    d_h = tables.harmonic[before + n] - tables.harmonic[before]
    shape = np.broadcast_shapes(d_h.shape, np.shape(rel_before), np.shape(r))
    rest = np.divide((r - 1) * (n - (before + 1) * d_h), n - 1, out=np.zeros(shape), where=n > 1)
    return np.divide(r * ((rel_before + 1) * d_h + rest), n, out=np.zeros(shape), where=n > 0)


def _tie_aware_ap(rel: np.ndarray, tot: np.ndarray, cutoff: int, tables: _Tables) -> np.ndarray:
    """Expected AP@K over uniformly random orders within equal-distance groups, from the histograms.

    Groups wholly inside the top K contribute their expected precision sum. The group cut by K (if any)
    puts a hypergeometric number s of its relevant items among its first c = K - before positions; the
    AP given s is (full-group sum + expected cut sum given s) / (relevant in full groups + s).
    """
    before = np.cumsum(tot, axis=1) - tot
    rel_before = np.cumsum(rel, axis=1) - rel
    full = before + tot <= cutoff
    numer = np.where(full, _expected_precision_sum(before, rel_before, tot, rel, tables), 0.0).sum(axis=1)

    rows = np.arange(len(rel))
    has_cut = ~full.all(axis=1)
    g = np.argmin(full, axis=1)  # first group crossing K; meaningless where has_cut is False
    n_cut = np.where(has_cut, tot[rows, g], 0)
    r_cut = np.where(has_cut, rel[rows, g], 0)
    c_cut = np.where(has_cut, cutoff - before[rows, g], 0)
    start_cut = np.where(has_cut, before[rows, g], 0)
    rel_full = np.where(has_cut, rel_before[rows, g], rel.sum(axis=1))

    s = np.arange(int(np.minimum(r_cut, c_cut).max()) + 1)[None, :]
    r2, c2, n2 = r_cut[:, None], c_cut[:, None], n_cut[:, None]
    valid = (s <= r2) & (s <= c2) & (c2 - s <= n2 - r2)
    s_ok = np.where(valid, s, 0)
    log_pmf = (
        tables.log_choose(r2, s_ok)
        + tables.log_choose(n2 - r2, np.where(valid, c2 - s, 0))
        - tables.log_choose(n2, c2)
    )
    pmf = np.where(valid, np.exp(log_pmf), 0.0)
    cut_sum = _expected_precision_sum(start_cut[:, None], rel_full[:, None], c2, s_ok, tables)
    ap_given_s = _ratio(numer[:, None] + cut_sum, rel_full[:, None] + s_ok)
    return (pmf * ap_given_s).sum(axis=1)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, 0 where den == 0 (no item retrieved, or no relevant item)."""
    num = np.asarray(num, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast_shapes(num.shape, np.shape(den))), where=den > 0)


def _encode_labels(
    query_labels: np.ndarray, n: int, db_labels: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Map query and database labels to small ints so relevance is one cheap comparison."""
    q, db = np.asarray(query_labels), np.asarray(db_labels)
    if q.shape != (n,) or db.shape != (m,):
        raise UserError(
            f"labels must be 1-D and match the codes: got {q.shape} for {n} queries and "
            f"{db.shape} for {m} database items"
        )
    _, inverse = np.unique(np.concatenate([q, db]), return_inverse=True)
    inverse = inverse.astype(np.int32)
    return inverse[:n], inverse[n:]


def _min_class_distance(codes: np.ndarray, class_codes: np.ndarray, name: str) -> np.ndarray:
    if len(codes) == 0:
        raise UserError(f"{name} is empty: OOD rates need at least one input")
    if len(class_codes) == 0:
        raise UserError("OOD detection needs at least one class code")
    out = np.empty(len(codes), dtype=np.int64)
    for start, block in iter_hamming_rows(codes, class_codes):
        out[start : start + len(block)] = block.min(axis=1)
    return out


def _msp_score(logits: np.ndarray, name: str) -> np.ndarray:
    """-log(max softmax) of each row, exact in float64 down to margins of ~700 nats."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0 or logits.shape[1] < 2:
        raise UserError(f"{name} must be a non-empty (n, classes >= 2) logit array, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        raise UserError(f"{name} contains NaN or infinite logits")
    others = np.exp(logits - logits.max(axis=1, keepdims=True))
    others[np.arange(len(others)), logits.argmax(axis=1)] = 0.0
    return np.log1p(others.sum(axis=1))
