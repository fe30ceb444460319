"""Speed settings: precision and compile modes of the process and the student, FLOP counts."""
