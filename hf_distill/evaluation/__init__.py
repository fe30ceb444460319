"""Scoring students: held-out token scores and draft acceptance, sampled-completion statistics, HumanEval in a sandbox."""
