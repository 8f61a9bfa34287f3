"""tools/serve.py with every forward pass of the engine failing: fault injection for
tests/serving/test_isolation.py (the engine must stop itself and the server exit non-zero)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.llm import LLM  # noqa: E402
from tools.serve import main  # noqa: E402


def _failing_forward(self: LLM, batch: object) -> None:
    raise RuntimeError("injected fault: every forward pass fails")


LLM._forward = _failing_forward

if __name__ == "__main__":
    main()
