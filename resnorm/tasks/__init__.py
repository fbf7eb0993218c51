"""Labelled tasks for fine-tuning: reading and splitting them, the built-in ones, the task heads on a
pre-trained model, the fine-tuning recipe (a rate grid with early stopping) and the floors."""
