"""Model families written as layer math over plain weight tensors (see base.ModelAdapter)."""
