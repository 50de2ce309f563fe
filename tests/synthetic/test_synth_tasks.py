"""Synthetic task generators, checked against independent solvers; data splits; scoring.

No model is involved: every check here is exact (integers and token strings), so there are no
tolerances.
"""

from __future__ import annotations

import bisect
import itertools
import random
from fractions import Fraction

import pytest

from mamba_ft.errors import UserError
from mamba_ft.synthetic import data
from mamba_ft.synthetic.base import Example, full_answer
from mamba_ft.synthetic.tasks import make_task, task_names
from mamba_ft.synthetic.scoring import score

# (task, params, train length range) for the generic checks.
CASES = [
    ("copy", {}, (1, 12)),
    ("prefix_ngram", {}, (8, 20)),
    ("suffix_ngram", {"ngram": 2, "answer_len": 3}, (6, 15)),
    ("mqar", {"keys": 32, "values": 16}, (2, 12)),
    ("mqar_zoology", {"vocab_size": 64, "tokens_per_pair": 8}, (1, 12)),
    ("arithmetic", {"form": "cot"}, (1, 6)),
    ("arithmetic", {"form": "direct", "prime": 7}, (1, 6)),
    ("lis", {"form": "cot"}, (2, 12)),
    ("lis", {"form": "direct", "values": 20}, (2, 12)),
    ("dp_local", {"form": "cot"}, (3, 12)),
    ("dp_nonlocal", {"form": "cot", "lag": 4}, (3, 12)),
    ("dp_nonlocal", {"form": "direct", "modulus": 7}, (3, 12)),
]


def test_registry_lists_all_tasks():
    assert task_names() == ["arithmetic", "copy", "dp_local", "dp_nonlocal", "lis", "mqar", "mqar_zoology",
                            "prefix_ngram", "suffix_ngram"]


@pytest.mark.parametrize("name,params,lengths", [c for c in CASES if c[0] != "mqar_zoology"])
def test_teacher_forcing_batches_of_the_older_tasks_are_unchanged(name, params, lengths):
    # Teacher forcing now batches by prompt and answer length, not by supervision mask (which
    # mqar_zoology's queries vary); for every other task the answer length fixes the mask, so
    # the batches, and with them every score, stay as they were.
    from mamba_ft.synthetic.predict import _batches_by_length

    task = make_task(name, **params)
    examples = [e for n in range(lengths[0], lengths[1] + 1) for e in data.test_examples(task, n, 12, 0, set())]
    assert list(_batches_by_length(examples, 5, by_mask=False)) == list(_batches_by_length(examples, 5))


@pytest.mark.parametrize("name,params,lengths", CASES)
def test_deterministic_for_a_seed(name, params, lengths):
    task = make_task(name, **params)
    a = data.train_examples(task, *lengths, count=40, seed=7)
    b = data.train_examples(make_task(name, **params), *lengths, count=40, seed=7)
    c = data.train_examples(task, *lengths, count=40, seed=8)
    assert a == b
    assert a != c
    # A test set at one length does not depend on which other lengths are asked for.
    assert data.test_examples(task, lengths[1], 10, 7, set()) == data.test_examples(task, lengths[1], 10, 7, set())


@pytest.mark.parametrize("name,params,lengths", CASES)
def test_tokens_in_vocab_and_tokenizer_agrees(name, params, lengths):
    task = make_task(name, **params)
    tok = task.vocab.hf_tokenizer()
    for ex in data.train_examples(task, *lengths, count=20, seed=0):
        assert len(ex.supervised) == len(ex.answer)
        ids = task.vocab.encode(ex.tokens)  # KeyError if a token is not in the vocabulary
        assert tok(" ".join(ex.tokens))["input_ids"] == ids
        assert tok.decode(ids) == " ".join(ex.tokens)


@pytest.mark.parametrize("name,params,lengths", CASES)
def test_no_test_prompt_seen_in_training(name, params, lengths):
    task = make_task(name, **params)
    train = data.train_examples(task, *lengths, count=300, seed=0)
    seen = data.prompts(train)
    for n in range(lengths[0], lengths[1] + 1, max(1, (lengths[1] - lengths[0]) // 3)):
        test = data.test_examples(task, n, 30, 0, seen)
        assert not data.prompts(test) & seen
        assert len(data.prompts(test)) == len(test)  # distinct within the test set too


def test_small_space_gives_smaller_test_set_not_leaks():
    # Binary strings of length 3: 8 prompts in all; training on lengths 1-3 takes most of them.
    task = make_task("copy", alphabet=2)
    seen = data.prompts(data.train_examples(task, 1, 3, count=200, seed=0))
    test = data.test_examples(task, 3, 50, 0, seen)
    all_prompts = {("$", *s, "|") for s in itertools.product("ab", repeat=3)}
    assert {e.prompt for e in test} == all_prompts - seen


# --- independent solvers ----------------------------------------------------------------------

def test_copy_answer_is_the_string():
    task = make_task("copy", alphabet=5)
    for n in (1, 7, 50):
        ex = task.sample(random.Random(n), n)
        assert ex.prompt[0] == "$" and ex.prompt[-1] == "|" and ex.answer[-1] == "."
        assert ex.answer[:-1] == ex.prompt[1:-1] and len(ex.answer) == n + 1
        assert set(ex.answer[:-1]) <= set("abcde")


@pytest.mark.parametrize("name", ["prefix_ngram", "suffix_ngram"])
def test_ngram_lookup_answer_by_string_search(name):
    task = make_task(name, alphabet=6, ngram=3, answer_len=4)
    rng = random.Random(1)
    for _ in range(50):
        ex = task.sample(rng, rng.randint(10, 30))
        text = "".join(ex.prompt)
        if name == "prefix_ngram":  # $ g | s |  ->  c .
            gram, s = text[1:].split("|")[:2]
        else:  # $ s | g  ->  c .
            s, gram = text[1:].split("|")
        assert len(gram) == 3 and s.count(gram) == 1  # str.count counts non-overlapping: also check overlaps
        assert sum(s.startswith(gram, i) for i in range(len(s))) == 1
        at = s.find(gram) + 3
        assert "".join(ex.answer) == s[at:at + 4] + "."


def test_mqar_answers_from_the_table():
    task = make_task("mqar", keys=20, values=10)
    rng = random.Random(2)
    for n in (1, 5, 20):
        ex = task.sample(rng, n)
        pairs = ex.prompt[1:-1]
        table = dict(zip(pairs[0::2], pairs[1::2]))
        assert len(table) == n  # keys distinct
        assert all(k.startswith("k") and v.startswith("v") for k, v in table.items())
        queries, answers = ex.answer[0::2], ex.answer[1::2]
        assert sorted(queries) == sorted(table)
        assert [table[q] for q in queries] == list(answers)
        assert ex.supervised == (False, True) * n


def _eval_mod_p(tokens, p):
    """Evaluate an infix expression with Python's own parser over the rationals, then map to Z_p
    (a ring homomorphism wherever the denominators are invertible mod p)."""
    expr = " ".join(f"Fraction({t})" if t.isdigit() else t for t in tokens)
    value = eval(expr, {"Fraction": Fraction})  # noqa: S307 - our own generated tokens
    return value.numerator * pow(value.denominator, -1, p) % p


def _count_ops(tokens):
    return sum(t in "+-*/" for t in tokens)


@pytest.mark.parametrize("prime", [5, 11, 13])
def test_arithmetic_cot_steps_by_direct_evaluation(prime):
    cot = make_task("arithmetic", prime=prime, form="cot")
    direct = make_task("arithmetic", prime=prime, form="direct")
    rng = random.Random(prime)
    for i in range(60):
        n_ops = rng.randint(1, 8)
        ex = cot.sample(random.Random(i), n_ops)
        ex_direct = direct.sample(random.Random(i), n_ops)
        assert ex.prompt == ex_direct.prompt
        expr = list(ex.prompt[1:-1])
        assert _count_ops(expr) == n_ops
        value = _eval_mod_p(expr, prime)
        assert ex_direct.answer == (str(value), "<eos>")
        steps = [s.split() for s in " ".join(ex.answer[:-1]).split(" = ")]
        assert len(steps) == n_ops  # one reduction per step
        for k, step in enumerate(steps):
            assert _count_ops(step) == n_ops - k - 1
            assert _eval_mod_p(step, prime) == value
        assert steps[-1] == [str(value)]


def _lis_patience(xs):
    """dp via patience sorting: dp[i] = 1 + the pile that x_i lands on (strict increase)."""
    tails, dp = [], []
    for x in xs:
        k = bisect.bisect_left(tails, x)
        tails[k:k + 1] = [x]
        dp.append(k + 1)
    return dp, len(tails)


def _lis_brute(xs):
    """The longest strictly increasing subsequence by trying every subsequence (small n only)."""
    return max(r for r in range(1, len(xs) + 1) for c in itertools.combinations(xs, r)
               if all(a < b for a, b in zip(c, c[1:])))


def test_lis_dp_table_by_patience_sorting_and_brute_force():
    cot = make_task("lis", values=30, form="cot")
    direct = make_task("lis", values=30, form="direct")
    for i in range(80):
        n = random.Random(i).randint(1, 25)
        ex = cot.sample(random.Random(i), n)
        xs = [int(t) for t in ex.prompt[1:-1]]
        assert len(xs) == n and all(0 <= x < 30 for x in xs)
        dp, best = _lis_patience(xs)
        assert list(ex.answer) == [*map(str, dp), "<sep>", str(best), "<eos>"]
        assert direct.sample(random.Random(i), n).answer == (str(best), "<eos>")
        if n <= 10:
            assert _lis_brute(xs) == best


def test_lis_answers_spread_out():
    # The planted run keeps answers from all being ~2 sqrt(n).
    task = make_task("lis", values=64, form="direct")
    answers = {e.answer[0] for e in data.train_examples(task, 20, 20, count=200, seed=0)}
    assert len(answers) >= 10


def _dp_states_closed_form(xs, lag, modulus):
    """s_i = s_{i-lag} + a_i unrolled: the sum of the inputs at i, i - lag, i - 2 lag, ... (1-based)."""
    return [sum(xs[j] for j in range(i, -1, -lag)) % modulus for i in range(len(xs))]


@pytest.mark.parametrize("name,params", [("dp_local", {}), ("dp_local", {"modulus": 3}),
                                         ("dp_nonlocal", {}), ("dp_nonlocal", {"lag": 3, "modulus": 13})])
def test_dp_traces_and_answers_by_closed_form(name, params):
    cot = make_task(name, **params)
    direct = make_task(name, **params, form="direct")
    lag = params.get("lag", 8) if name == "dp_nonlocal" else 1
    m = params.get("modulus", 10)
    for n in (1, 2, 5, lag, lag + 1, 3 * lag + 2, 40):
        for seed in range(20):
            ex, ex_direct = cot.sample(random.Random(seed), n), direct.sample(random.Random(seed), n)
            assert ex.prompt == ex_direct.prompt
            assert ex.prompt[0] == "<bos>" and ex.prompt[-1] == "<sep>" and len(ex.prompt) == n + 2
            xs = [int(t) for t in ex.prompt[1:-1]]
            assert all(0 <= x < m for x in xs)
            states = _dp_states_closed_form(xs, lag, m)
            # The trace: every input (given) followed by its state (predicted), then the answer.
            assert ex.answer == (*(str(t) for x, s in zip(xs, states) for t in (x, s)), "<sep>", str(states[-1]), "<eos>")
            assert ex.supervised == (False, True) * n + (True, True, True)
            assert ex_direct.answer == (str(states[-1]), "<eos>") and all(ex_direct.supervised)
            assert cot.final_answer(ex.answer) == direct.final_answer(ex_direct.answer) == (str(states[-1]),)


def test_dp_local_and_nonlocal_traces_share_format_and_length():
    # Same seed, same length: the same inputs, and traces that differ only in their state values.
    local, far = make_task("dp_local"), make_task("dp_nonlocal", lag=5)
    differ = 0
    for n in (1, 4, 6, 11, 30):
        for seed in range(10):
            a, b = local.sample(random.Random(seed), n), far.sample(random.Random(seed), n)
            assert a.prompt == b.prompt and a.supervised == b.supervised
            assert len(a.answer) == len(b.answer) == 2 * n + 3
            for i, (ta, tb) in enumerate(zip(a.answer, b.answer)):
                assert ta.isdigit() == tb.isdigit()  # states where states are, markers where markers are
                if ta != tb:
                    assert a.supervised[i]  # only predicted states differ, never the given inputs
                    differ += 1
            assert local.vocab == far.vocab
    assert differ > 0  # the two DPs are not the same (for n > lag)


def test_score_dp_final_answer_at_its_positions():
    task = make_task("dp_nonlocal", lag=2)
    ex = task.sample(random.Random(0), 4)
    answer = list(ex.answer)
    assert score(task, [ex], [tuple(answer)]) == {
        "exact_match": 1.0, "token_accuracy": 1.0, "answer_accuracy": 1.0, "examples": 1}
    # A wrong state in the trace, the right final answer; given inputs predicted as junk (teacher
    # forcing predicts there too), even a marker: ignored, and the answer is read where it stands.
    wrong_chain = answer.copy()
    wrong_chain[1] = str((int(answer[1]) + 1) % 10)
    wrong_chain[0] = wrong_chain[2] = "<sep>"
    got = score(task, [ex], [tuple(wrong_chain)])
    assert got["exact_match"] == 0.0 and got["answer_accuracy"] == 1.0
    assert got["token_accuracy"] == pytest.approx(6 / 7)  # 4 states, <sep>, answer, <eos>
    wrong_answer = answer.copy()
    wrong_answer[-2] = str((int(answer[-2]) + 1) % 10)
    assert score(task, [ex], [tuple(wrong_answer)])["answer_accuracy"] == 0.0
    assert score(task, [ex], [tuple(answer[:-1])])["answer_accuracy"] == 0.0  # no EOS: not finished


# --- encoding and scoring ---------------------------------------------------------------------

def test_labels_only_on_supervised_answer_tokens():
    task = make_task("mqar", keys=8, values=8)
    ex = task.sample(random.Random(0), 3)
    row = data.encode_example(task, ex)
    ids = task.vocab.encode(ex.tokens)
    assert row["input_ids"] == ids
    p = len(ex.prompt)
    assert row["labels"][:p] == [-100] * p
    assert row["labels"][p:] == [-100 if i % 2 == 0 else ids[p + i] for i in range(len(ex.answer))]


def test_score_hand_built_copy():
    task = make_task("copy")
    exs = [full_answer(["$", "a", "b", "|"], ["a", "b", "."]),
           full_answer(["$", "c", "|"], ["c", "."])]
    assert score(task, exs, [("a", "b", "."), ("c", ".")]) == {
        "exact_match": 1.0, "token_accuracy": 1.0, "answer_accuracy": 1.0, "examples": 2}
    # one wrong token in the first; the second stops early (generation cut short)
    got = score(task, exs, [("a", "c", "."), ("c",)])
    assert got["exact_match"] == 0.0
    assert got["token_accuracy"] == pytest.approx(3 / 5)
    # a right string followed by junk instead of EOS is not an exact match
    assert score(task, exs[1:], [("c", "c")])["exact_match"] == 0.0


def test_score_cot_final_answer_separately():
    task = make_task("arithmetic", prime=11)
    ex = full_answer(["<bos>", "1", "+", "2", "*", "3", "="], ["1", "+", "6", "=", "7", "<eos>"])
    wrong_chain_right_answer = ("1", "+", "5", "=", "7", "<eos>")
    got = score(task, [ex], [wrong_chain_right_answer])
    assert got["exact_match"] == 0.0 and got["answer_accuracy"] == 1.0
    assert got["token_accuracy"] == pytest.approx(5 / 6)
    # a longer chain that still ends in the right result counts for the answer
    assert score(task, [ex], [("1", "+", "6", "=", "7", "=", "7", "<eos>")])["answer_accuracy"] == 1.0
    assert score(task, [ex], [("1", "+", "6", "=", "8", "<eos>")])["answer_accuracy"] == 0.0


def test_score_ignores_unsupervised_positions():
    task = make_task("mqar", keys=4, values=4)
    ex = Example(("<bos>", "k0", "v1", "k1", "v2", "|"), ("k1", "v2", "k0", "v1"), (False, True) * 2)
    got = score(task, [ex], [("k3", "v2", "k3", "v0")])  # queries wrong (ignored), one value wrong
    assert got["token_accuracy"] == 0.5 and got["exact_match"] == 0.0


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params,match", [
    ("cpy", {}, "Did you mean 'copy'"),
    ("copy", {"alphabet": 40}, "alphabet=40"),
    ("copy", {"colour": 1}, "parameters are: alphabet"),
    ("arithmetic", {"prime": 10}, "prime=10"),
    ("arithmetic", {"form": "chain"}, "form='chain'"),
    ("lis", {"values": 1}, "values=1"),
    ("mqar", {"keys": 1}, "keys=1"),
    ("suffix_ngram", {"alphabet": 2, "ngram": 2}, "unique 2-grams"),
    ("dp_local", {"lag": 3}, "parameters are: modulus, form"),
    ("dp_nonlocal", {"lag": 1}, "lag=1"),
    ("dp_nonlocal", {"modulus": 1}, "modulus=1"),
    ("dp_local", {"form": "chain"}, "form='chain'"),
])
def test_bad_task_parameters(name, params, match):
    with pytest.raises(UserError, match=match):
        make_task(name, **params)


def test_length_out_of_range():
    with pytest.raises(UserError, match="must lie in"):
        data.test_examples(make_task("mqar", keys=8), 9, 5, 0, set())
    with pytest.raises(UserError, match="must lie in"):
        data.train_examples(make_task("prefix_ngram"), 3, 10, 5, 0)  # needs ngram + answer_len >= 7


def test_every_shipped_recipe_validates():
    from pathlib import Path

    from mamba_ft.synthetic.spec import load_spec

    recipes = sorted((Path(__file__).resolve().parents[2] / "recipes" / "synthetic").glob("*.yaml"))
    assert len(recipes) >= 8
    for path in recipes:
        spec = load_spec(str(path))  # keys, task parameters and every length checked
        assert spec.train_lengths[1] < max(spec.test_lengths), f"{path.name} tests no length past training"
