"""Evaluation of trained checkpoints: loading, generation, the paper's benchmark suite, lm-eval."""
