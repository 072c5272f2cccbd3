"""lm-eval task YAMLs over the offline data in ../shared/data (data.py); harness.lm_eval includes them."""
