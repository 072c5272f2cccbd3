"""Reports over harness run folders: tables and the one headline-metric rule (runs), the end-of-run console
summary, plots, the reference check, and where the notebook finds a results folder's inputs (locate)."""
