"""Reinforcement learning: advantage estimators, policy losses, KL estimators and the RL loop."""
