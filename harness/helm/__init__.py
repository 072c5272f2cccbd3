"""HELM integration: the runner, executor, client and tokenizer HELM drives, and the engine pool."""
