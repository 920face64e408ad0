"""Constants and small helpers shared by the tests."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SGD = json.dumps({"name": "sgd", "learning_rate": 0.1})
