"""Scoring students: held-out token scores, teacher NLL and draft acceptance, HumanEval in a sandbox."""
