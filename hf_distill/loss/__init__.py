"""One micro-batch's loss: which positions count, the batch path through the teacher source and the signals, the output
strategies."""
