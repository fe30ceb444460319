"""Checks made before and during a run: option values, sizes and labels, and the safety checks that keep a run from
ending with a wrong student."""
