"""The reward service: preference join, online reward-model training, hot-swapped scoring."""
