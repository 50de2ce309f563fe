"""Synthetic tasks: COPY, n-gram lookup, associative recall and chain-of-thought DP generators
with exact scoring (`mamba-ft synth`, docs/synthetic.md), and the in-context rules corpus
(`icl_rules`)."""
