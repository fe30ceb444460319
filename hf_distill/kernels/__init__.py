"""Fast ways to compute the output layer and its loss: the chunked head, the closed form, the compiled kernel, Liger, bf16 backward products."""
