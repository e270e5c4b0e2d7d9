"""Recall@K on hand-made cases whose answers are known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmsearch.errors import InputFileError
from mmsearch.evaluate import positive_ranks, recalls
from mmsearch.pairs import group, read_pairs


def test_positive_ranks_and_recalls_by_hand() -> None:
    scores = np.array([
        [0.9, 0.1, 0.5, 0.3],  # positive col 0: rank 0
        [0.9, 0.1, 0.5, 0.3],  # positive col 2: rank 1
        [0.9, 0.8, 0.5, 0.3],  # positive col 3: rank 3
        [0.1, 0.2, 0.3, 0.4],  # positives cols 0 and 2: best is col 2, rank 1
    ])
    positives = np.zeros_like(scores, dtype=bool)
    positives[0, 0] = positives[1, 2] = positives[2, 3] = positives[3, 0] = positives[3, 2] = True
    ranks = positive_ranks(scores, positives)
    assert ranks.tolist() == [0, 1, 3, 1]
    assert recalls(ranks, (1, 2, 4)) == {"R@1": 0.25, "R@2": 0.75, "R@4": 1.0}


def test_reranking_reorders_only_the_top_k() -> None:
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    positives = np.array([[False, False, True, False]])

    def boost_col_2(rows: np.ndarray, cands: np.ndarray) -> np.ndarray:
        return np.where(cands == 2, 1.0, 0.0)

    assert positive_ranks(scores, positives, boost_col_2, rerank_k=3).tolist() == [0]
    assert positive_ranks(scores, positives, boost_col_2, rerank_k=2).tolist() == [2]  # outside the top 2

    def zero(rows: np.ndarray, cands: np.ndarray) -> np.ndarray:
        return np.zeros(cands.shape)

    assert positive_ranks(scores, positives, zero, rerank_k=4).tolist() == [2]


def test_read_pairs_jsonl_csv_and_errors(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    (tmp_path / "img" / "b.png").write_bytes(b"x")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        json.dumps({"image": "img/a.png", "text": "cat"}) + "\n\n"
        + json.dumps({"image": "img/b.png", "text": "cat"}) + "\n"
        + json.dumps({"image": "img/b.png", "text": "dog"}) + "\n"
    )
    images, texts, links = group(read_pairs(jsonl))
    assert [p.name for p in images] == ["a.png", "b.png"] and texts == ["cat", "dog"]
    assert links == [(0, 0), (1, 0), (1, 1)]
    csv = tmp_path / "p.csv"
    csv.write_text("image,text\nimg/a.png,a cat\n")
    assert read_pairs(csv)[0].text == "a cat"

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "img/zzz.png", "text": "cat"}) + "\n")
    with pytest.raises(InputFileError, match=r"bad.jsonl:1: no such image"):
        read_pairs(bad)
    bad.write_text("{nope\n")
    with pytest.raises(InputFileError, match=r"bad.jsonl:1: not valid JSON"):
        read_pairs(bad)
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path,caption\nx,y\n")
    with pytest.raises(InputFileError, match="'image' and 'text' columns"):
        read_pairs(bad_csv)
