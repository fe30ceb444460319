"""What a run writes: atomic files, output folders, model cards."""
