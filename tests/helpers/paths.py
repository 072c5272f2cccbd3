"""Where the tests find data kept beside the repository."""

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
HELM_DATA = SHARED_DATA / "helm-scenarios"
