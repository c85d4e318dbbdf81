"""Training: the recipe, the run, the loop, the run folder, distributed setup, distillation."""
