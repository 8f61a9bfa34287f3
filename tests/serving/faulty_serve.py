"""tools/serve.py with every forward pass of the engine failing: fault injection for
tests/serving/test_isolation.py (the engine must stop itself and the server exit non-zero)."""


from qwen_vl_triton.cli.serve import main
from qwen_vl_triton.engine.model_runner import ModelRunner


def _failing_forward(self: ModelRunner, *args: object) -> None:
    raise RuntimeError("injected fault: every forward pass fails")


ModelRunner.forward = _failing_forward

if __name__ == "__main__":
    main()
