"""A user's install: the built wheel (not an editable checkout) in a fresh venv beside the newest
transformers, used from a directory outside the repository.

transformers >= 5.25 requires Hugging Face's `kernels` distribution, a top-level module of that name;
while our code was top-level `kernels`, `engine`, ... it collided with it (imports resolved to the
other package, depending on the working directory). This test installs what a user installs and
runs what a user runs: the `qvl-generate` console script on the demo checkpoint, and `LLM.generate`
from Python, asserting real tokens; and it reads the wheel's RECORD to prove that `qwen_vl_triton`
is the only top-level module it installs.

The venv resolves the newest releases pyproject.toml allows (not requirements/lock-*.txt), with the
pinned torch installed first as `make install` does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = re.search(r"^TORCH_PIN\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
TIMEOUT_S = 1200  # a hang guard: the installs download and unpack a few hundred MB

LLM_SCRIPT = """
import json, sys
from qwen_vl_triton import LLM, Media, Prompt, SamplingParams
from qwen_vl_triton.modeling.processing import SAMPLE_IMAGE_PATH
llm = LLM(sys.argv[1], kv_cache_gb=0.25)
[out] = llm.generate([Prompt("Describe this image.", [Media(SAMPLE_IMAGE_PATH)])],
                     SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
[sample] = out.outputs
print(json.dumps({"tokens": sample.token_ids, "finish_reason": sample.finish_reason, "error": repr(out.error)}))
llm.shutdown()
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


def test_the_wheel_installs_alone_and_generates_from_outside_the_checkout(tmp_path):
    # No PYTHONPATH and no checkout on sys.path: only what the venv installed can be imported.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QVL_KERNELS", "TRITON_INTERPRET")}
    env["QVL_CACHE"] = str(tmp_path / "cache")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)], tmp_path, env)
    [wheel] = dist.glob("qwen_vl_triton-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    _run([str(python), "-m", "pip", "install", "-q", TORCH_PIN], tmp_path, env)
    _run([str(python), "-m", "pip", "install", "-q", "--upgrade", f"{wheel}[triton]", "transformers"], tmp_path, env)
    versions = json.loads(_run([str(python), "-m", "pip", "list", "--format", "json"], tmp_path, env))
    print("installed beside the wheel:", {p["name"]: p["version"] for p in versions
                                           if p["name"] in ("torch", "transformers", "kernels", "triton")})

    # The wheel's files: the package, its metadata, and the console scripts; nothing else at the top level.
    [record] = (venv / "lib").glob("python3*/site-packages/qwen_vl_triton-*.dist-info/RECORD")
    tops = {line.split(",")[0].split("/")[0] for line in record.read_text().splitlines()}
    assert {t for t in tops if not t.endswith(".dist-info") and t != ".."} == {"qwen_vl_triton"}, tops
    scripts = sorted(p.name for p in bin_dir.glob("qvl-*"))
    assert scripts == ["qvl-benchmark", "qvl-eval", "qvl-generate", "qvl-make-tiny-checkpoint", "qvl-quantize",
                       "qvl-serve"], scripts

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    op = _run([str(python), "-c", "import qwen_vl_triton; print(qwen_vl_triton.kernels.rms_norm.__module__)"],
              outside, env)
    assert op.strip() == "qwen_vl_triton.kernels.norms", op

    # The console script on the demo checkpoint (made by transformers, the newest one) and its sample image.
    _run([str(bin_dir / "qvl-generate"), "--max_output_length", "6", "--ignore_eos", "--temperature", "0",
          "--output_json", "out.json"], outside, env)
    [result] = json.loads((outside / "out.json").read_text())["results"]
    assert result["finish_reason"] == "length" and len(result["output_token_ids"]) == 6, result
    assert result["text"].strip(), result

    # LLM.generate from Python, on the checkpoint the script made.
    [checkpoint] = (tmp_path / "cache").glob("tiny-qwen2_5_vl")
    out = json.loads(_run([str(python), "-c", LLM_SCRIPT, str(checkpoint)], outside, env).splitlines()[-1])
    assert out["error"] == "None" and out["finish_reason"] == "length", out
    assert len(out["tokens"]) == 6 and out["tokens"] == result["output_token_ids"], (out, result)
