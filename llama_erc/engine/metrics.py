"""Classification metrics the ERC papers report (scikit-learn), and the confusion matrix as text and PNG.

Weighted F1 is the headline (DialogueLLM reports accuracy and weighted F1). The PNG is written with zlib and a
3x5 pixel font, so no plotting dependency is needed: a heat map of row-normalised counts, the count in each
cell, true labels down the side, predicted labels along the top.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support


def classification_report(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    unknown = sorted(set(y_true) - set(labels))
    if unknown:
        raise ValueError(f"gold labels {unknown} are not in the label set {labels}")
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": len(y_true),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {lab: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                            "support": int(s[i])} for i, lab in enumerate(labels)},
        "labels": list(labels),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def confusion_text(cm: list[list[int]], labels: list[str]) -> str:
    width = max(7, *(len(x) for x in labels)) + 1
    lines = ["true \\ pred".ljust(width) + "".join(x.rjust(width) for x in labels)]
    lines += [labels[i].ljust(width) + "".join(str(v).rjust(width) for v in row) for i, row in enumerate(cm)]
    return "\n".join(lines) + "\n"


def report_text(report: dict) -> str:
    lines = [f"n {report['n']} | accuracy {100 * report['accuracy']:.2f} | weighted F1 "
             f"{100 * report['weighted_f1']:.2f} | macro F1 {100 * report['macro_f1']:.2f}", "",
             f"{'label':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for lab, m in report["per_class"].items():
        lines.append(f"{lab:<12}{100 * m['precision']:>10.2f}{100 * m['recall']:>10.2f}{100 * m['f1']:>10.2f}"
                     f"{m['support']:>10}")
    return "\n".join(lines) + "\n\n" + confusion_text(report["confusion_matrix"], report["labels"])


# 3x5 glyphs, five rows of three pixels each, '#' = ink. Lower case is drawn as upper case.
_FONT = {
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"), "2": ("###", "..#", "###", "#..", "###"),
    "3": ("###", "..#", "###", "..#", "###"), "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", "..#", "..#", "..#"), "8": ("###", "#.#", "###", "#.#", "###"),
    "9": ("###", "#.#", "###", "..#", "###"), "A": (".#.", "#.#", "###", "#.#", "#.#"), "B": ("##.", "#.#", "##.", "#.#", "##."),
    "C": (".##", "#..", "#..", "#..", ".##"), "D": ("##.", "#.#", "#.#", "#.#", "##."), "E": ("###", "#..", "##.", "#..", "###"),
    "F": ("###", "#..", "##.", "#..", "#.."), "G": (".##", "#..", "#.#", "#.#", ".##"), "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"), "J": ("..#", "..#", "..#", "#.#", ".#."), "K": ("#.#", "#.#", "##.", "#.#", "#.#"),
    "L": ("#..", "#..", "#..", "#..", "###"), "M": ("#.#", "###", "###", "#.#", "#.#"), "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "O": (".#.", "#.#", "#.#", "#.#", ".#."), "P": ("##.", "#.#", "##.", "#..", "#.."), "Q": (".#.", "#.#", "#.#", "##.", ".##"),
    "R": ("##.", "#.#", "##.", "#.#", "#.#"), "S": (".##", "#..", ".#.", "..#", "##."), "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"), "V": ("#.#", "#.#", "#.#", "#.#", ".#."), "W": ("#.#", "#.#", "###", "###", "#.#"),
    "X": ("#.#", "#.#", ".#.", "#.#", "#.#"), "Y": ("#.#", "#.#", ".#.", ".#.", ".#."), "Z": ("###", "..#", ".#.", "#..", "###"),
    "-": ("...", "...", "###", "...", "..."), "_": ("...", "...", "...", "...", "###"), ".": ("...", "...", "...", "...", ".#."),
    " ": ("...", "...", "...", "...", "..."),
}

def _draw_text(img: np.ndarray, x: int, y: int, text: str, scale: int, color: tuple[int, int, int]) -> None:
    for ch in text.upper():
        for r, row in enumerate(_FONT.get(ch, _FONT["-"])):
            for col, c in enumerate(row):
                if c == "#":
                    img[y + r * scale:y + (r + 1) * scale, x + col * scale:x + (col + 1) * scale] = color
        x += 4 * scale


def _write_png(path: Path, img: np.ndarray) -> None:
    """img: (H, W, 3) uint8 -> an 8-bit RGB PNG (filter 0 on every row)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[row].tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.write_bytes(png)


def confusion_png(cm: list[list[int]], labels: list[str], path: str | Path, title: str = "") -> None:
    counts = np.asarray(cm, dtype=np.int64)  # (C, C) rows = true, cols = predicted
    n = len(labels)
    scale, cell = 2, 44
    name_w = 4 * scale * max(len(x) for x in labels) + 8
    top = 6 * scale * 2 + name_w  # title line, then the vertical column labels
    left = name_w + 6
    img = np.full((top + n * cell + 8, left + n * cell + 8, 3), 255, dtype=np.uint8)
    if title:
        _draw_text(img, 4, 4, title[: (img.shape[1] - 8) // (4 * scale)], scale, (0, 0, 0))
    row_sums = np.maximum(counts.sum(1, keepdims=True), 1)
    frac = counts / row_sums
    for i in range(n):
        _draw_text(img, 4, top + i * cell + cell // 2 - 5, labels[i], scale, (0, 0, 0))
        # column labels written vertically, one letter per line, so long names fit above narrow cells
        for j, ch in enumerate(labels[i][: (name_w - 8) // (6 * scale)]):
            _draw_text(img, left + i * cell + cell // 2 - 3, 6 * scale * 2 + j * 6 * scale, ch, scale, (0, 0, 0))
        for j in range(n):
            shade = int(255 - 200 * frac[i, j])
            color = (shade, shade, 255)  # white -> blue with the row fraction
            y0, x0 = top + i * cell, left + j * cell
            img[y0 + 1:y0 + cell - 1, x0 + 1:x0 + cell - 1] = color
            text = str(int(counts[i, j]))
            ink = (255, 255, 255) if frac[i, j] > 0.5 else (0, 0, 0)
            _draw_text(img, x0 + (cell - 4 * scale * len(text)) // 2, y0 + cell // 2 - 5, text, scale, ink)
    _write_png(Path(path), img)
