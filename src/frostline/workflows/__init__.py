"""Workflows built on the model API: two-phase recipes, freezing schedules, distillation."""
