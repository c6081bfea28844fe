"""Looking at runs and models: TensorBoard events, profiles, plots, per-token scores
and attention maps. Each module is one tool; the CLI and the training loop import them."""
