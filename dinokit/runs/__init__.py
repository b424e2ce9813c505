"""Run bookkeeping: output folders and locks, metric logs and figures, TensorBoard."""
