"""Data in: datasets, chat and prompt-completion rows, the teacher's generations and cache, alignment between tokenizers, offline assets."""
