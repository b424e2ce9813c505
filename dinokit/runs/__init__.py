"""Run bookkeeping: output folders and locks, safe file writing, metric logs and figures, TensorBoard."""
