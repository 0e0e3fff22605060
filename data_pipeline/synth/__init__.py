"""Multi-hop VQA synthesis from a KB: questions, gold tool-use trajectories, filters, splits, export."""
