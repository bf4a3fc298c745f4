"""The trainer service: continuous PPO (or RLOO / GRPO) against the live reward model,
checkpoints in the model store, the promotion gate, resume after a crash, and the gRPC
Trainer control API. See loop.py for the algorithm, top to bottom, and its `build_trainer`
for how the Trainer, its Checkpointer, Promoter and prompt and reward sources fit together."""
