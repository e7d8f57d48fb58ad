"""Metrics equal scikit-learn's and a hand computation from the confusion matrix; the PNG is a valid image."""
import struct
import zlib

import pytest
from sklearn.metrics import f1_score

from llama_erc.engine.metrics import classification_report, confusion_png, confusion_text

LABELS = ["neutral", "joy", "sadness"]
Y_TRUE = ["neutral"] * 5 + ["joy"] * 3 + ["sadness"] * 2
Y_PRED = ["neutral", "neutral", "neutral", "joy", "sadness", "joy", "joy", "neutral", "sadness", "neutral"]


def test_report_matches_hand_computation_and_sklearn():
    rep = classification_report(Y_TRUE, Y_PRED, LABELS)
    assert rep["confusion_matrix"] == [[3, 1, 1], [1, 2, 0], [1, 0, 1]]
    assert rep["accuracy"] == pytest.approx(6 / 10)
    f1 = {"neutral": 2 * 3 / (5 + 5), "joy": 2 * 2 / (3 + 3), "sadness": 2 * 1 / (2 + 2)}  # 2TP / (P + T)
    assert rep["weighted_f1"] == pytest.approx((5 * f1["neutral"] + 3 * f1["joy"] + 2 * f1["sadness"]) / 10)
    assert rep["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    assert rep["weighted_f1"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="weighted"))
    assert rep["per_class"]["joy"] == {"precision": pytest.approx(2 / 3), "recall": pytest.approx(2 / 3),
                                       "f1": pytest.approx(2 / 3), "support": 3}


def test_unknown_gold_label_is_an_error():
    with pytest.raises(ValueError, match="anger"):
        classification_report(["anger"], ["joy"], LABELS)


def test_confusion_text_and_png(tmp_path):
    rep = classification_report(Y_TRUE, Y_PRED, LABELS)
    text = confusion_text(rep["confusion_matrix"], LABELS)
    assert text.splitlines()[1].split() == ["neutral", "3", "1", "1"]
    confusion_png(rep["confusion_matrix"], LABELS, tmp_path / "cm.png", title="test")
    data = (tmp_path / "cm.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    idat = data[data.index(b"IDAT") + 4:data.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)
