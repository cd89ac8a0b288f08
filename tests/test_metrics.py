"""The paper's downstream metrics (eval.py) against values worked out by hand on small examples.

Each expected value is derived in the comment beside it; degenerate inputs (ties, all-zero predictions,
a class never predicted, a constant predictor) must give a defined number, never NaN, never a warning.
"""
import math
import warnings

import numpy as np
import pytest
import torch

from evaluation.metrics import (accuracy, binary_prf, glue_metrics, matthews_corrcoef, multilabel_metrics, pearson,
                                rankdata, regression_metrics, retrieval_recall, spearman, weighted_f1)


@pytest.fixture(autouse=True)
def no_warnings():
    """Any RuntimeWarning (numpy 0/0) or other warning raised inside a metric fails the test."""
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        yield


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5        # positions 0 and 2 agree: 2/4
    assert accuracy([], []) == 0.0                             # empty: defined as 0
    with pytest.raises(ValueError):
        accuracy([1, 2], [1])
    with pytest.raises(ValueError):
        accuracy([float("nan")], [1.0])                        # a NaN prediction is an error, not a NaN metric


def test_pearson_by_hand_and_constant():
    # x = [1,2,3], y = [2,4,7]: dx = [-1,0,1], dy = [-7/3,-1/3,8/3]; sum dx dy = 5, sum dx^2 = 2,
    # sum dy^2 = 114/9 -> r = 5 / sqrt(228/9) = 15 / sqrt(228)
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228))
    assert pearson([1, 2, 3], [-1, -2, -3]) == pytest.approx(-1.0)
    assert pearson([0.5, 0.5, 0.5], [1, 2, 3]) == 0.0          # constant predictor: 0, not NaN
    assert pearson([1.0], [2.0]) == 0.0
    assert pearson([1, 2], [3, 5]) == pytest.approx(1.0)        # two points lie on a line
    assert pearson([1, 2], [5, 3]) == pytest.approx(-1.0)


def test_rankdata_and_spearman_with_ties():
    assert rankdata([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]   # the two 3s share ranks 3 and 4
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4]: dx = [-1.5,0,0,1.5], dy = [-1.5,-.5,.5,1.5]
    # sum dx dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> rho = 4.5 / sqrt(22.5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(math.sqrt(0.9))
    assert spearman([5, 5, 5], [1, 2, 3]) == 0.0


def test_binary_prf_and_never_predicted_class():
    # pred [1,1,0,0,1] vs target [1,0,1,0,1]: TP = 2 (pos 0, 4), FP = 1 (pos 1), FN = 1 (pos 2)
    assert binary_prf([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    # all-zero predictions: the positive class is never predicted -> P = 0 (0/0), R = 0, F1 = 0
    assert binary_prf([0, 0, 0], [1, 0, 1]) == (0.0, 0.0, 0.0)
    # nothing positive anywhere: every ratio is 0/0 -> 0
    assert binary_prf([0, 0], [0, 0]) == (0.0, 0.0, 0.0)


def test_weighted_f1():
    # same example: F1(class 1) = 2/3 with support 3; class 0: TP = 1 (pos 3), FP = 1 (pos 2), FN = 1 (pos 1)
    # -> F1(0) = 1/2 with support 2; weighted = 3/5 * 2/3 + 2/5 * 1/2 = 0.6
    assert weighted_f1([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx(0.6)
    # all-zero predictions, target [1,0,1,0]: F1(1) = 0; class 0: TP 2, FP 2, FN 0 -> P 1/2, R 1, F1 2/3
    # weighted = 1/2 * 0 + 1/2 * 2/3 = 1/3
    assert weighted_f1([0, 0, 0, 0], [1, 0, 1, 0]) == pytest.approx(1 / 3)
    assert weighted_f1([], []) == 0.0


def test_matthews():
    # TP 2, TN 1, FP 1, FN 1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6
    assert matthews_corrcoef([1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx(1 / 6)
    assert matthews_corrcoef([0, 1, 1, 0], [0, 1, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 0, 1], [0, 1, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0   # constant prediction: zero denominator -> 0
    # three classes (Gorodkin): c = 2 correct of s = 3; true counts t = [1,1,1], predicted p = [1,2,0]
    # -> (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (6 - 3) / sqrt((9 - 5)(9 - 3)) = 3 / sqrt(24)
    assert matthews_corrcoef([0, 1, 1], [0, 1, 2]) == pytest.approx(3 / math.sqrt(24))
    # predicted and true class counts differ: TP 1, TN 1, FP 0, FN 2 -> (1 - 0) / sqrt(1 * 3 * 1 * 3) = 1/3
    assert matthews_corrcoef([1, 0, 0, 0], [1, 1, 1, 0]) == pytest.approx(1 / 3)
    rng = np.random.default_rng(0)                               # and the 2-class closed form on random labels
    for _ in range(20):
        p, t = rng.integers(0, 2, 15), rng.integers(0, 2, 15)
        tp, tn = np.sum((p == 1) & (t == 1)), np.sum((p == 0) & (t == 0))
        fp, fn = np.sum((p == 1) & (t == 0)), np.sum((p == 0) & (t == 1))
        den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        assert matthews_corrcoef(p, t) == pytest.approx((tp * tn - fp * fn) / den if den else 0.0)


def test_regression_metrics_by_hand():
    pred = [-2.4, 0.6, 0.0, 1.5, -0.5, 2.9]
    target = [-3.0, 1.0, 0.0, -1.0, 0.0, 3.0]
    m = regression_metrics(pred, target)
    assert m["mae"] == pytest.approx((0.6 + 0.4 + 0 + 2.5 + 0.5 + 0.1) / 6)
    # negative vs non-negative: pred>=0 [F,T,T,T,F,T], target>=0 [F,T,T,F,T,T] -> 4/6 agree
    assert m["acc2_nonneg"] == pytest.approx(4 / 6)
    # class True (support 4): TP 3, FP 1, FN 1 -> F1 3/4; class False (support 2): TP 1, FP 1, FN 1 -> 1/2
    assert m["f1_nonneg"] == pytest.approx(4 / 6 * 0.75 + 2 / 6 * 0.5)
    # excluding target == 0 (rows 2 and 4): pred>0 [F,T,T,T], target>0 [F,T,F,T] -> 3/4
    assert m["acc2_pos"] == pytest.approx(0.75)
    # class True (support 2): TP 2, FP 1, FN 0 -> F1 0.8; class False (support 2): TP 1, FP 0, FN 1 -> 2/3
    assert m["f1_pos"] == pytest.approx(0.5 * 0.8 + 0.5 * 2 / 3)
    # rounded pred [-2, 1, 0, 2, -0, 3] vs target [-3, 1, 0, -1, 0, 3]: rows 1, 2, 4, 5 agree
    assert m["acc7"] == pytest.approx(4 / 6)
    assert m["corr"] == pytest.approx(np.corrcoef(pred, target)[0, 1])
    # a prediction of exactly 0 on a non-zero target counts as negative: pred>0 [F,F,T,F] = target>0 [F,F,T,F]
    m = regression_metrics([0.0, 0.0, 1.0, -1.0], [-1.0, -2.0, 2.0, -1.0])
    assert m["acc2_pos"] == 1.0 and m["f1_pos"] == 1.0


def test_acc7_rounding_and_clipping():
    # numpy rounds half to even (0.5 -> 0, 1.5 -> 2, 2.5 -> 2); values beyond +-3 are clipped first
    m = regression_metrics([0.5, 1.5, 2.5, -3.7, 4.0], [0, 2, 2, -3, 3])
    assert m["acc7"] == 1.0


def test_regression_degenerate_inputs():
    # every target 0: the "excluding zeros" convention has no rows -> 0.0; a constant prediction -> corr 0
    m = regression_metrics([0.1, 0.1, 0.1], [0.0, 0.0, 0.0])
    assert m["acc2_pos"] == 0.0 and m["f1_pos"] == 0.0 and m["corr"] == 0.0
    assert m["acc2_nonneg"] == 1.0 and m["f1_nonneg"] == 1.0
    assert all(math.isfinite(v) for v in m.values())
    # torch tensors are accepted as well
    m2 = regression_metrics(torch.tensor([0.1, 0.1, 0.1]), torch.zeros(3))
    assert m2["mae"] == pytest.approx(0.1)


def test_multilabel_by_hand():
    pred = [[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    target = [[1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    m = multilabel_metrics(np.array(pred), np.array(target))
    # Jaccard per row: 1/3, 0/1, 2/2, both empty -> 0 (baselines' convention) -> mean (1/3 + 1) / 4
    assert m["accuracy"] == pytest.approx((1 / 3 + 0 + 1 + 0) / 4)
    # TP = 1 + 0 + 2 = 3, FP = 1 (row 0 col 2), FN = 2 (row 0 col 1, row 1 col 2)
    assert m["precision"] == pytest.approx(3 / 4)
    assert m["recall"] == pytest.approx(3 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert m["subset_acc"] == pytest.approx(2 / 4)             # rows 2 and 3 match exactly
    # classes 3-5 are never predicted nor true: no effect, no NaN


def test_multilabel_all_zero_predictions():
    target = np.array([[1, 0, 0], [0, 1, 1]])
    m = multilabel_metrics(np.zeros((2, 3)), target)
    assert m == {"accuracy": 0.0, "f1": 0.0, "precision": 0.0, "recall": 0.0, "subset_acc": 0.0}
    with pytest.raises(ValueError):
        multilabel_metrics(np.zeros(3), np.zeros(3))            # must be [N, C]


def test_retrieval_recall_ties_pessimistic():
    sim = np.array([[0.9, 0.1, 0.5],
                    [0.8, 0.7, 0.7],    # col 0 beats the positive, col 2 ties it -> rank 2
                    [0.2, 0.3, 0.1]])   # both negatives beat the positive -> rank 2
    r = retrieval_recall(sim, ks=(1, 2, 3))
    assert r == pytest.approx({"R@1": 1 / 3, "R@2": 1 / 3, "R@3": 1.0})
    # other direction: rows of sim.T: [.9,.8,.2] rank 0, [.1,.7,.3] rank 0, [.5,.7,.1] rank 2
    assert retrieval_recall(torch.tensor(sim).T, ks=(1, 2, 3)) == pytest.approx(
        {"R@1": 2 / 3, "R@2": 2 / 3, "R@3": 1.0})
    # a collapsed representation (every similarity equal) retrieves nothing below K = N
    assert retrieval_recall(np.ones((4, 4)), ks=(1, 3, 5)) == {"R@1": 0.0, "R@3": 0.0, "R@5": 1.0}
    with pytest.raises(ValueError):
        retrieval_recall(np.ones((2, 3)))


def test_glue_metrics_per_task():
    assert glue_metrics("CoLA", [1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx({"mcc": 1 / 6})
    assert glue_metrics("MRPC", [1, 1, 0, 0, 1], [1, 0, 1, 0, 1]) == pytest.approx({"f1": 2 / 3, "acc": 3 / 5})
    assert glue_metrics("STS-B", [1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(
        {"pearson": pearson([1, 2, 2, 3], [10, 20, 30, 40]), "spearman": math.sqrt(0.9)})
    assert glue_metrics("RTE", [0, 1], [1, 1]) == {"acc": 0.5}
    with pytest.raises(ValueError):
        glue_metrics("SQuAD", [0], [0])
