"""Data in: datasets, chat and prompt-completion rows, the teacher's generations and cache, sampled completions and
their statistics, provenance records, alignment between tokenizers, offline assets."""
