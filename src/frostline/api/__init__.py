"""The model API: layers, models, selection, summary, callbacks, optimizers, losses, metrics, saving, the zoo."""
