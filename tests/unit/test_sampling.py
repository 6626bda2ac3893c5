from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from llmos.engine.sampling import (
    BatchSampling,
    apply_penalties,
    apply_top_p,
    draw,
    select_tokens,
    token_logprobs,
)


def _sampling(temps: list[float], top_p: float = 1.0, seeds: list[int | None] | None = None) -> BatchSampling:
    n = len(temps)
    seeds = seeds or [None] * n
    return BatchSampling(
        torch.tensor(temps),
        torch.full((n,), top_p),
        torch.zeros(n),
        torch.zeros(n),
        [torch.Generator().manual_seed(s) if s is not None else None for s in seeds],
    )


def test_greedy_rows_take_argmax_while_others_sample() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 5.0, 1.0]])
    chosen = select_tokens(logits, _sampling([0.0, 1.0], seeds=[None, 3]))
    assert chosen[0].item() == 1
    assert chosen[1].item() in (0, 1, 2)


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(1, 50)
    a = [select_tokens(logits, _sampling([1.0], seeds=[7])).item() for _ in range(3)]
    b = [select_tokens(logits, _sampling([1.0], seeds=[7])).item() for _ in range(3)]
    assert a == b


def test_top_p_keeps_the_smallest_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(apply_top_p(logits, torch.tensor([0.7])))
    assert kept.tolist() == [[True, True, False, False]]
    # The most likely token always survives, even at a tiny top_p, and at 0 (the API admits it).
    assert torch.isfinite(apply_top_p(logits, torch.tensor([0.01])))[0, 0]
    assert torch.isfinite(apply_top_p(logits, torch.tensor([0.0]))).tolist() == [[True, False, False, False]]


def test_tiny_top_p_sampling_is_greedy() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    for seed in range(5):
        assert select_tokens(logits, _sampling([1.5], top_p=0.01, seeds=[seed])).item() == 1


def test_penalties_follow_openai_definition() -> None:
    logits = torch.zeros(1, 3)
    counts = torch.tensor([[2.0, 0.0, 1.0]])
    out = apply_penalties(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    assert out.tolist() == [[-1.0, 0.0, -0.75]]


def test_logprobs_are_from_the_model_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    chosen_lp, top_vals, top_idx = token_logprobs(logits, torch.tensor([1]), 2)
    assert abs(chosen_lp.item() - torch.log(torch.tensor(0.2)).item()) < 1e-5
    assert top_idx.tolist() == [[0, 1]]
    assert top_vals.shape == (1, 2)


def test_select_rows_keeps_parameters_aligned() -> None:
    s = _sampling([0.0, 0.5, 1.0], seeds=[1, 2, 3])
    kept = s.select(torch.tensor([0, 2]))
    assert kept.temperature.tolist() == [0.0, 1.0]
    assert kept.generators[1] is s.generators[2]


@pytest.mark.parametrize("seeded", [True, False], ids=["a-seeded-row", "torch's-generator-only"])
def test_draws_follow_each_rows_weights_and_never_take_a_zero(seeded: bool) -> None:
    """20,000 draws from two rows of unnormalised weights (zeros at both ends and between, one
    tiny weight): each row's counts fit its own distribution by a chi-square test, and no token
    of weight 0 is ever drawn; with a seeded row beside one that uses torch's generator, and with
    torch's generator alone (the batched path)."""
    weights = torch.tensor(
        [[0.0, 3.0, 0.0, 1.0, 2.0, 1e-3, 0.0], [5.0, 0.0, 0.5, 0.5, 0.0, 4.0, 0.0]], dtype=torch.float32
    )
    generators: list[torch.Generator | None] = [torch.Generator().manual_seed(11) if seeded else None, None]
    torch.manual_seed(12)
    counts = torch.zeros_like(weights)
    for _ in range(20_000):
        chosen = draw(weights, generators)
        counts[torch.arange(2), chosen] += 1
    assert bool((counts[weights == 0] == 0).all())
    for row in range(2):
        kept = weights[row] > 0.01
        expected = weights[row][kept] / weights[row].sum() * 20_000
        observed = counts[row][kept]
        expected = expected * observed.sum() / expected.sum()  # the tiny weight's draws left out of the test
        assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-4


def test_a_draw_uses_its_rows_generator_only() -> None:
    """Seeded rows draw the same tokens whatever other rows share the call, and the same seed gives
    the same tokens again."""
    weights = torch.rand(3, 50)

    def tokens(seed: int, others: int) -> list[int]:
        generator = torch.Generator().manual_seed(seed)
        rows: list[torch.Generator | None] = [torch.Generator().manual_seed(99 + i) for i in range(others)]
        got = [int(draw(torch.cat([weights[:1], weights[1 : 1 + others]]), [generator, *rows])[0]) for _ in range(20)]
        return got

    assert tokens(5, 0) == tokens(5, 2) == tokens(5, 1)
    assert tokens(5, 0) != tokens(6, 0)


def test_rows_that_are_not_distributions_raise_instead_of_drawing() -> None:
    """NaN, all-zero or negative weights raise (the engine then fails that row alone), where a
    search would have returned an index past the vocabulary."""
    for bad in ([float("nan"), 1.0], [0.0, 0.0], [-1.0, 2.0]):
        with pytest.raises(ValueError, match="not a distribution"):
            draw(torch.tensor([[1.0, 1.0], bad]), [None, None])


def test_each_row_gets_its_own_choice_among_greedy_fixed_and_sampled_rows() -> None:
    """Sampled rows whose distribution is one token get that token, at their own positions between
    greedy and fixed rows; greedy and fixed rows draw nothing from their generators."""
    logits = torch.full((5, 6), -1e4)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = logits[3, 5] = logits[4, 0] = 0.0
    logits[0, 3] = -0.5  # greedy row 0: its argmax is 2
    sampling = _sampling([0.0, 1.0, 0.7, 1.0, 0.0], seeds=[1, 2, 3, 4, 5])
    states = [g.get_state() for g in sampling.generators if g is not None]
    chosen = select_tokens(logits, sampling, fixed={3: 0})
    assert chosen.tolist() == [2, 4, 1, 0, 0]
    after = [g.get_state() for g in sampling.generators if g is not None]
    assert [torch.equal(a, b) for a, b in zip(states, after, strict=True)] == [True, False, False, True, True]
