"""Labelled tasks for fine-tuning: reading and splitting them, the built-in ones, and the task heads on a
pre-trained model."""
