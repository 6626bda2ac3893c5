"""The rerank benchmark's split: no article both trains (or chooses the epochs) and measures."""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks.rerank_xquad import mcnemar_p, split_by_article


def _rows(articles: int) -> list[dict[str, Any]]:
    return [{"title": f"article {a}", "question": f"q{a}.{q}"} for a in range(articles) for q in range(3)]


def _titles(rows: list[dict[str, Any]]) -> set[str]:
    return {r["title"] for r in rows}


def test_validation_articles_come_from_the_training_share_and_no_article_is_in_two_parts() -> None:
    rows = _rows(10)
    train, validation, test = split_by_article(rows, 0.6, 2)
    assert _titles(train) == {f"article {a}" for a in range(4)}
    assert _titles(validation) == {"article 4", "article 5"}
    assert _titles(test) == {f"article {a}" for a in range(6, 10)}
    assert len(train) + len(validation) + len(test) == len(rows)


def test_the_test_articles_do_not_depend_on_the_validation_split() -> None:
    rows = _rows(48)
    assert split_by_article(rows, 0.6, 1)[2] == split_by_article(rows, 0.6, 5)[2]


@pytest.mark.parametrize("validation_articles", [0, 6, 7])
def test_a_split_leaving_a_part_empty_is_refused(validation_articles: int) -> None:
    with pytest.raises(SystemExit):
        split_by_article(_rows(10), 0.6, validation_articles)


def test_mcnemar_exact_p() -> None:
    assert mcnemar_p(36, 25) == pytest.approx(0.2000, abs=1e-4)  # the 2026-12-06 run's 61 discordant questions
    assert mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_p(3, 3) == 1.0
