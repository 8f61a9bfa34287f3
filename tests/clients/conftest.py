"""The live server the clients talk to (a tiny checkpoint behind tools/serve.py) and the hand-made
datasets with their media: tests/serving/conftest.py's fixtures, imported so that they have one
definition."""

from tests.serving.conftest import media_dir, server, serving_ckpt  # noqa: F401  (pytest finds them here)
