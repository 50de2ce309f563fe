"""`mqar_zoology`, Zoology's MQAR format, against a brute-force solver and its format rules:
distinct keys and values from disjoint vocabularies, no answer in the input, loss and score
only at the queries, power-law gaps. The old `mqar` format is left as it was."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from mamba_ft.errors import UserError
from mamba_ft.models import load_model
from mamba_ft.synthetic import data, predict
from mamba_ft.synthetic.model_configs import mamba_config
from mamba_ft.synthetic.scoring import score
from mamba_ft.synthetic.spec import load_spec
from mamba_ft.synthetic.tasks import make_task

FILL = "<fill>"


def solve(prompt) -> dict[str, str]:
    """The key -> value table, read off the context by hand: <bos> k v k v ..."""
    pairs = prompt[1:]
    return {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}


@pytest.mark.parametrize("vocab_size, tokens_per_pair, lengths", [(8192, 16, (1, 4, 16, 64)),
                                                                  (40, 4, (1, 7, 20))])
def test_every_target_is_the_brute_force_lookup(vocab_size, tokens_per_pair, lengths):
    task = make_task("mqar_zoology", vocab_size=vocab_size, tokens_per_pair=tokens_per_pair)
    n_keys = vocab_size // 2
    rng = random.Random(0)
    for n in lengths:
        for _ in range(30):
            ex = task.sample(rng, n)
            table = solve(ex.prompt)
            keys, values = ex.prompt[1::2], ex.prompt[2::2]
            assert ex.prompt[0] == "<bos>" and len(ex.prompt) == 1 + 2 * n
            assert len(set(keys)) == n and len(set(values)) == n  # both distinct
            # Disjoint vocabularies: keys k0..k{n_keys-1}, values v0..v{vocab_size-n_keys-1}.
            assert all(k[0] == "k" and int(k[1:]) < n_keys for k in keys)
            assert all(v[0] == "v" and int(v[1:]) < vocab_size - n_keys for v in values)
            assert len(ex.answer) == tokens_per_pair * n - 2 * n
            queried = []
            for i, token in enumerate(ex.answer):
                if token in table:  # a query: the value is the target at the next position only
                    queried.append(token)
                    assert i % 2 == 0 and ex.answer[i + 1] == FILL
                    assert ex.targets[i + 1] == table[token] and ex.supervised[i + 1]
                else:
                    assert token == FILL
                    if i == 0 or ex.answer[i - 1] not in table:
                        assert ex.targets[i] == token and not ex.supervised[i]
            assert sorted(queried) == sorted(keys)  # each key asked exactly once
            assert sum(ex.supervised) == n
            assert not set(ex.answer) & set(values)  # no answer is ever in the input


def test_labels_and_scores_only_at_the_queries():
    task = make_task("mqar_zoology", vocab_size=64, tokens_per_pair=8)
    ex = task.sample(random.Random(3), 5)
    table = solve(ex.prompt)
    row = data.encode_example(task, ex)
    ids = task.vocab.encode(ex.tokens)
    assert row["input_ids"] == ids  # fillers, never values, in the input
    # Written out: a label only right after each query key, and it is that key's value.
    expected = [-100] * len(ids)
    for pos in range(len(ex.prompt), len(ex.tokens) - 1):
        if ex.tokens[pos] in table:
            expected[pos + 1] = task.vocab.index[table[ex.tokens[pos]]]
    assert row["labels"] == expected

    # Scoring reads only those positions: junk elsewhere is free, one wrong value costs 1/5.
    right = [table[ex.answer[i - 1]] if ex.supervised[i] else "k0" for i in range(len(ex.answer))]
    assert score(task, [ex], [right])["token_accuracy"] == 1.0
    wrong, first = list(right), ex.supervised.index(True)
    wrong[first] = "v0" if right[first] != "v0" else "v1"
    got = score(task, [ex], [wrong])
    assert got["token_accuracy"] == pytest.approx(4 / 5) and got["exact_match"] == 0.0


@pytest.mark.parametrize("exponent", [0.99, 1.5])
def test_gaps_follow_the_power_law(exponent):
    # The first key of the context draws its slot first, from all slots: its gap g (slot number
    # after the context, from 1) has P(g) ∝ g^-exponent exactly. Fit the log-log slope of the
    # counts in octave bins, weighted by the counts (Var log n ≈ 1/n for Poisson counts).
    pairs, tokens_per_pair, samples = 4, 64, 20_000
    task = make_task("mqar_zoology", tokens_per_pair=tokens_per_pair, gap_exponent=exponent)
    slots = (tokens_per_pair - 2) * pairs // 2  # 124
    rng = random.Random(11)
    gaps = []
    for _ in range(samples):
        ex = task.sample(rng, pairs)
        gaps.append(ex.answer.index(ex.prompt[1]) // 2 + 1)
    gaps = np.array(gaps)
    edges = [1, 2, 4, 8, 16, 32, 64, slots + 1]
    counts = np.array([((gaps >= a) & (gaps < b)).sum() for a, b in zip(edges, edges[1:])])
    width = np.diff(edges)
    x = np.log(np.sqrt(np.array(edges[:-1]) * (np.array(edges[1:]) - 1)))  # a bin's geometric middle

    def slope(bin_mass):
        y, w = np.log(bin_mass / width), counts
        xm, ym = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
        return (w * (x - xm) * (y - ym)).sum() / (w * (x - xm) ** 2).sum()

    observed = slope(counts)
    # The same fit on the exact power law's bin masses takes out what binning itself does.
    exact = slope(np.array([sum(g ** -exponent for g in range(a, b)) for a, b in zip(edges, edges[1:])]))
    assert exact == pytest.approx(-exponent, abs=0.03)  # the binning moves the slope little
    # Weighted least squares: Var(slope) = 1 / Σ w (x − x̄)²; 20,000 draws give about 0.007.
    se = 1 / math.sqrt((counts * (x - (counts * x).sum() / counts.sum()) ** 2).sum())
    assert se < 0.01
    assert observed == pytest.approx(exact, abs=4 * se)


def test_queries_take_distinct_slots_and_sit_nearer_than_uniform():
    # With the default exponent most queries come soon after the context, but every key still
    # gets its own slot; a uniform draw (exponent 0) puts the mean slot near the middle.
    def mean_gap(exponent):
        task = make_task("mqar_zoology", tokens_per_pair=32, gap_exponent=exponent)
        rng = random.Random(5)
        gaps = []
        for _ in range(2000):
            ex = task.sample(rng, 8)
            slots = [i // 2 + 1 for i, t in enumerate(ex.answer) if t != FILL]
            assert len(slots) == len(set(slots)) == 8
            gaps += slots
        return float(np.mean(gaps))

    slots = (32 - 2) * 8 // 2  # 120
    assert mean_gap(0.0) == pytest.approx((slots + 1) / 2, rel=0.03)
    assert mean_gap(0.99) < slots / 4


def test_greedy_is_teacher_forced_when_no_answer_is_fed_back():
    # The input never holds a value, so a model's outputs cannot change what it reads: greedy
    # decoding must give the teacher-forced argmax, computed here one example at a time.
    task = make_task("mqar_zoology", vocab_size=32, tokens_per_pair=6)
    model = load_model(mamba_config(len(task.vocab), 16, 2, 4), need_tokenizer=False,
                       allow_transformers=True, seed=0).model.eval()
    examples = data.test_examples(task, 3, 6, 0, set()) + data.test_examples(task, 5, 4, 0, set())
    by_hand = []
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([task.vocab.encode(ex.tokens)])).logits[0]
            start = len(ex.prompt)
            by_hand.append(tuple(task.vocab.decode(logits[start - 1:-1].argmax(-1))))
    assert predict.greedy(model, task.vocab, examples, batch_size=4) == by_hand
    assert predict.teacher_forced(model, task.vocab, examples, batch_size=4) == by_hand


@pytest.mark.parametrize("params, match", [
    ({"vocab_size": 2}, "vocab_size=2"),
    ({"tokens_per_pair": 7}, "tokens_per_pair=7"),
    ({"tokens_per_pair": 2}, "tokens_per_pair=2"),
    ({"gap_exponent": -1}, "gap_exponent=-1"),
    ({"power_a": 0.01}, "parameters are: vocab_size, tokens_per_pair, gap_exponent"),
])
def test_bad_parameters_are_one_clear_error(params, match):
    with pytest.raises(UserError, match=match):
        make_task("mqar_zoology", **params)


def test_more_pairs_than_keys_is_refused():
    with pytest.raises(UserError, match="must lie in \\[1, 16\\]"):
        data.test_examples(make_task("mqar_zoology", vocab_size=32), 17, 5, 0, set())


def test_bare_task_name_and_recipe_overrides():
    spec = load_spec("mqar_zoology")
    assert spec.tasks()[0][1].vocab_size == 512
    spec = load_spec("mqar_zoology", ["task_args.vocab_size=8192", "task_args.gap_exponent=1.2"])
    task = spec.tasks()[0][1]
    assert (task.vocab_size, task.gap_exponent, len(task.vocab)) == (8192, 1.2, 8192 + 4)
    with pytest.raises(UserError, match="tokens_per_pair=9"):
        load_spec("mqar_zoology", ["task_args.tokens_per_pair=9"])
