"""Using a trained run: predict, embed, export, probe, inspect.

Every command opens its run folder through `run.open_trained`, which rebuilds the network
from config.json and loads its weights with strict key checks, and runs images through
`selfie.evaluation.forward_batches`, the path finetuning evaluates with.
"""
