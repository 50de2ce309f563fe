"""Dynamic programming with and without chain of thought (Feng et al. 2023, arXiv 2305.15408;
Ren, Li & Liu, arXiv 2410.03810).

- arithmetic: an expression over Z_p (+ - * /, / being the modular inverse) with `length`
  operators. CoT form writes the expression again after every single reduction:
  `<bos> ( 3 + 4 ) * 2 = 7 * 2 = 3 <eos>` (p = 11). Each step depends only on the previous
  one: a *local* DP, where theory says a constant-size Mamba suffices.
- lis: the length of the longest strictly increasing subsequence of `length` numbers below
  `values`. CoT form writes the dp table (dp[i] = length of the longest increasing
  subsequence ending at i) before the answer: `<bos> 5 1 3 <sep> 1 1 2 <sep> 2 <eos>`.
  dp[i] reads every earlier x and dp: a *non-local* DP, which needs COPY-like retrieval.
- dp_local / dp_nonlocal: two DPs over `length` digits a_1..a_n (mod `modulus`) whose CoT
  traces have the same tokens, layout and length, so that locality is the only difference
  (Ren et al.'s claim: CoT saves Mamba state only on a local DP). dp_local is the running sum
  s_i = s_{i-1} + a_i; dp_nonlocal is s_i = s_{i-lag} + a_i, with s_j = 0 for j <= 0. The CoT
  interleaves each input with its state, the inputs given (not predicted) as mqar's query keys
  are: `<bos> 3 5 4 <sep> 3 3 5 8 4 2 <sep> 2 <eos>` (dp_local, modulus 10; the answer starts
  at the second `3`, and only the s_i, `<sep>`, the final s_n and `<eos>` are predicted). So a
  local step reads the two tokens before it, and a non-local step reads a state 2 x lag tokens
  back; were the inputs left in the prompt only, even the running sum would first have to fetch
  a_i from n + 1 tokens back, a COPY.
`form: direct` keeps only the final answer after the prompt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

from mamba_ft.errors import UserError
from mamba_ft.synthetic.base import Example, Task, full_answer
from mamba_ft.synthetic.vocab import Vocab

_FORMS = ("cot", "direct")
_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def _check_form(task: Task, form: str) -> None:
    if form not in _FORMS:
        raise UserError(f"form={form!r} is not valid for task {task.name!r}; use 'cot' or 'direct'.")


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


# --- arithmetic -------------------------------------------------------------------------------

@dataclass
class Num:
    value: int


@dataclass
class Op:
    op: str
    left: "Num | Op"
    right: "Num | Op"


def apply_op(op: str, a: int, b: int, p: int) -> int:
    if op == "+":
        return (a + b) % p
    if op == "-":
        return (a - b) % p
    if op == "*":
        return (a * b) % p
    return (a * pow(b, -1, p)) % p  # "/": b is never 0 mod p (see expand)


def render(node) -> list[str]:
    """Tokens with the fewest brackets that parse back (left-associative, * / before + -) to
    the same tree."""
    if isinstance(node, Num):
        return [str(node.value)]
    out = []
    for child, is_right in ((node.left, False), (node.right, True)):
        part = render(child)
        if isinstance(child, Op):
            pc, pn = _PRECEDENCE[child.op], _PRECEDENCE[node.op]
            if pc < pn or (is_right and pc == pn):
                part = ["(", *part, ")"]
        out += part
        if not is_right:
            out.append(node.op)
    return out


def reduce_once(node, p: int):
    """The tree with its leftmost operation whose operands are both numbers evaluated."""
    if isinstance(node, Num):
        return node, False
    if isinstance(node.left, Num) and isinstance(node.right, Num):
        return Num(apply_op(node.op, node.left.value, node.right.value, p)), True
    left, done = reduce_once(node.left, p)
    if done:
        return Op(node.op, left, node.right), True
    right, done = reduce_once(node.right, p)
    return Op(node.op, node.left, right), done


@dataclass
class ArithmeticTask(Task):
    prime: int = 11
    form: str = "cot"

    name = "arithmetic"
    length_name = "number of operators"
    final_marker = "="
    max_length = 64

    def __post_init__(self):
        _check_form(self, self.form)
        if not _is_prime(self.prime) or not 3 <= self.prime <= 97:
            raise UserError(f"prime={self.prime} is not valid for task {self.name!r}; use a prime "
                            f"from 3 to 97 (the operands are the numbers below it).")

    @cached_property
    def vocab(self) -> Vocab:
        numbers = tuple(str(i) for i in range(self.prime))
        return Vocab(numbers + ("+", "-", "*", "/", "(", ")", "=", "<bos>", "<eos>", "<pad>"),
                     pad="<pad>", bos="<bos>", eos="<eos>")

    def expand(self, rng: random.Random, value: int) -> Op:
        """A random operation whose result is `value`; its operands are never a zero divisor,
        and later expansions keep every subtree's value, so no step ever divides by zero."""
        p = self.prime
        op = rng.choice("+-*/")
        if op == "+":
            a = rng.randrange(p)
            return Op(op, Num(a), Num((value - a) % p))
        if op == "-":
            a = rng.randrange(p)
            return Op(op, Num(a), Num((a - value) % p))
        if op == "*":
            a = rng.randrange(1, p)
            return Op(op, Num(a), Num(value * pow(a, -1, p) % p))
        b = rng.randrange(1, p)
        return Op(op, Num(value * b % p), Num(b))

    def random_expression(self, rng: random.Random, length: int):
        root = Num(rng.randrange(self.prime))
        for _ in range(length):
            leaves = []
            _collect_leaves(root, None, None, leaves)
            parent, side, leaf = rng.choice(leaves)
            new = self.expand(rng, leaf.value)
            if parent is None:
                root = new
            else:
                setattr(parent, side, new)
        return root

    def sample(self, rng: random.Random, length: int) -> Example:
        tree = self.random_expression(rng, length)
        prompt = ["<bos>", *render(tree), "="]
        steps = []
        while isinstance(tree, Op):
            tree, _ = reduce_once(tree, self.prime)
            steps.append(render(tree))
        if self.form == "direct":
            return full_answer(prompt, [*steps[-1], "<eos>"])
        answer = []
        for step in steps[:-1]:
            answer += [*step, "="]
        return full_answer(prompt, [*answer, *steps[-1], "<eos>"])


def _collect_leaves(node, parent, side, out):
    if isinstance(node, Num):
        out.append((parent, side, node))
    else:
        _collect_leaves(node.left, node, "left", out)
        _collect_leaves(node.right, node, "right", out)


# --- longest increasing subsequence -----------------------------------------------------------

def lis_table(xs: list[int]) -> list[int]:
    """dp[i] = length of the longest strictly increasing subsequence ending at xs[i] (O(n^2))."""
    dp = []
    for i, x in enumerate(xs):
        dp.append(1 + max((dp[j] for j in range(i) if xs[j] < x), default=0))
    return dp


@dataclass
class LISTask(Task):
    values: int = 64
    form: str = "cot"

    name = "lis"
    length_name = "sequence length"
    final_marker = "<sep>"

    def __post_init__(self):
        _check_form(self, self.form)
        if not 2 <= self.values <= 1000:
            raise UserError(f"values={self.values} is out of range for task {self.name!r}; use 2 to 1000.")
        self.max_length = self.values

    @cached_property
    def vocab(self) -> Vocab:
        # Numbers 0..values cover both the inputs (< values) and dp entries (<= length <= values).
        numbers = tuple(str(i) for i in range(self.values + 1))
        return Vocab(numbers + ("<sep>", "<bos>", "<eos>", "<pad>"), pad="<pad>", bos="<bos>", eos="<eos>")

    def sample(self, rng: random.Random, length: int) -> Example:
        xs = [rng.randrange(self.values) for _ in range(length)]
        # Plant an increasing run of random size at random places so answers spread over
        # [1, length] instead of bunching near the ~2*sqrt(length) of uniform sequences.
        planted = rng.randint(1, min(length, self.values))
        where = sorted(rng.sample(range(length), planted))
        for i, v in zip(where, sorted(rng.sample(range(self.values), planted))):
            xs[i] = v
        dp = lis_table(xs)
        prompt = ["<bos>", *map(str, xs), "<sep>"]
        answer = [str(max(dp)), "<eos>"]
        if self.form == "cot":
            answer = [*map(str, dp), "<sep>", *answer]
        return full_answer(prompt, answer)


# --- sums with a local or a non-local dependency ----------------------------------------------

@dataclass
class _LaggedSum(Task):
    """s_i = s_{i-lag} + a_i mod `modulus` (s_j = 0 for j <= 0); subclasses fix `lag`."""

    modulus: int = 10
    form: str = "cot"

    length_name = "number of digits"
    final_marker = "<sep>"
    lag: ClassVar[int]

    def __post_init__(self):
        _check_form(self, self.form)
        if not 2 <= self.modulus <= 100:
            raise UserError(f"modulus={self.modulus} is out of range for task {self.name!r}; use 2 to 100.")

    @cached_property
    def vocab(self) -> Vocab:
        digits = tuple(str(i) for i in range(self.modulus))
        return Vocab(digits + ("<sep>", "<bos>", "<eos>", "<pad>"), pad="<pad>", bos="<bos>", eos="<eos>")

    def sample(self, rng: random.Random, length: int) -> Example:
        xs = [rng.randrange(self.modulus) for _ in range(length)]
        states: list[int] = []
        for i, x in enumerate(xs):
            states.append(((states[i - self.lag] if i >= self.lag else 0) + x) % self.modulus)
        prompt = ("<bos>", *map(str, xs), "<sep>")
        final = (str(states[-1]), "<eos>")
        if self.form == "direct":
            return full_answer(prompt, final)
        trace = tuple(t for x, s in zip(xs, states) for t in (str(x), str(s)))
        answer = (*trace, "<sep>", *final)
        # The inputs in the trace are given; every state, the separator and the answer are predicted.
        supervised = tuple(i % 2 == 1 for i in range(len(trace))) + (True,) * (1 + len(final))
        return Example(prompt, answer, supervised)


@dataclass
class LocalSumTask(_LaggedSum):
    name = "dp_local"
    lag = 1


@dataclass
class NonlocalSumTask(_LaggedSum):
    lag: int = 8

    name = "dp_nonlocal"

    def __post_init__(self):
        super().__post_init__()
        if not 2 <= self.lag <= 1000:
            raise UserError(f"lag={self.lag} is out of range for task {self.name!r}; use 2 to 1000 "
                            f"(lag 1 is dp_local).")
