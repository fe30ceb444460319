"""Fast ways to compute the output layer and its loss: the chunked head, its compiled kernel, Liger, bf16 backward
products."""
