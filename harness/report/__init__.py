"""Reports over harness run folders: tables, the headline metric, plots and the reference check."""
