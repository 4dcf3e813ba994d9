"""Experiments built on the trainer and the evaluator (`python -m pec.experiments.paper_table`)."""
