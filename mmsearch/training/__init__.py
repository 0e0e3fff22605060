"""What every training recipe (SFT, RL) shares: parallelism, checkpoints with exact resume, the policy's
loading and saving, the LR schedule, metrics and curves, and periodic eval through the agent loop."""
