"""What a run writes: atomic files, output folders, provenance records, model cards."""
