"""The engine: the training loop, the frozen-part runner and its activation cache, data, distribution, the live optimizer."""
