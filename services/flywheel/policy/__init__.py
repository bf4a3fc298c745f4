"""The policy service: a continuous-batching engine with hot-swapped weights, and the starter policy."""
