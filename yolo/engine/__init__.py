"""Training engine: the loop, its optimizer/schedule, callbacks and results file."""
