"""The server's parts on hand-made cases, no server running: the MindIE config mapping, streamed-text
deltas and the engine's per-request streams."""

from __future__ import annotations

import json

import pytest

from serving.api_server import TextDelta
from serving.config import ServeConfig, read_mindie_config, strip_json_comments

# ------------------------------------------------------------------------------------- MindIE config

MINDIE_7B = """
{
    "ServerConfig": {
        "port" : 1025,
        "managementPort" : 1026,
        "httpsEnabled": false,
    },
    "BackendConfig": {
        "npuDeviceIds": [
            [0,1]
        ],
        "ModelDeployConfig": {
            "maxSeqLen": 32768,
            "maxInputTokenLen": 32768,
            "ModelConfig": [
                {
                    "modelInstanceType": "Standard",
                    "modelName": "qwen2_vl",
                    "modelWeightPath": "/data/Qwen2-VL-7B-Instruct",
                    "worldSize": 2,
                    "npuMemSize": 10, #KV Cache的显存大小，单位是GB，请勿设置为-1，需要给vit预留空间。
                }
            ]
        },
        "ScheduleConfig": {
            "maxPrefillTokens": 32768,
            "maxIterTimes": 2048, # 模型最大输出长度
        }
    }
}
"""


def test_mindie_config_mapping(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(MINDIE_7B)
    values, ignored = read_mindie_config(path)
    assert values == {"port": 1025, "max_seq_len": 32768, "max_input_length": 32768,
                      "served_model_name": ["qwen2_vl"], "model_path": "/data/Qwen2-VL-7B-Instruct",
                      "kv_cache_gb": 10.0, "max_prefill_tokens": 32768, "max_iter_times": 2048, "world_size": 2}
    assert "ServerConfig.managementPort" in ignored and "BackendConfig.npuDeviceIds" in ignored
    path.write_text(MINDIE_7B.replace('"httpsEnabled": false', '"httpsEnabled": true'))
    with pytest.raises(ValueError, match="httpsEnabled"):
        read_mindie_config(path)
    assert json.loads(strip_json_comments('{"a": "# not a comment", "b": [1, 2,], } // end')) == \
        {"a": "# not a comment", "b": [1, 2]}
    assert ServeConfig(model_path="/x/Qwen2-VL-7B").model_names() == ["Qwen2-VL-7B", "qwen2_vl"]


# ------------------------------------------------------------------------------------- stream deltas


def test_text_delta_holds_back_partial_characters_and_stop_prefixes():
    d = TextDelta([])
    assert d.update("ab\ufffd", False) == "ab"       # an unfinished UTF-8 character waits
    assert d.update("ab\u4e2d", False) == "\u4e2d"
    assert d.update("ab\u4e2d\ufffd", True) == "\ufffd"  # at the end it is what it is
    s = TextDelta(["STOP"])
    assert s.update("hello ST", False) == "hello"     # 3 characters held back
    assert s.update("hello STO", False) == " "
    assert s.update("hello ", True) == ""             # the engine cut the stop string away
    assert s.sent == "hello "


# ------------------------------------------------------------------------------------- request streams


def _output(n: int, finished: bool = False):
    from engine.llm import RequestOutput

    return RequestOutput("r", 3, list(range(n)), [0.0] * n, [None] * n, "x" * n, finished,
                         "length" if finished else None, 0, 0.1, 0.2, [0.1] * n)


def test_request_stream_keeps_the_newest_output_and_raises_errors():
    import asyncio

    from serving.async_engine import EngineError, RequestStream

    class FakeEngine:
        aborted: list[str] = []

        def abort(self, request_id: str) -> None:
            self.aborted.append(request_id)

    async def run() -> None:
        engine = FakeEngine()
        s = RequestStream(engine, "r")
        for n in (1, 2, 3):  # a slow reader: three steps arrive before it reads
            s.put(_output(n))
        assert len((await s.next()).output_ids) == 3
        s.put(_output(4, finished=True))
        assert (await s.next()).finished and s.finished
        s.close()
        assert engine.aborted == []  # finished: nothing to abort
        t = RequestStream(engine, "t")
        t.put(_output(1))
        t.put(EngineError("boom"))
        with pytest.raises(EngineError):
            await asyncio.wait_for(t.next(), 5)
        u = RequestStream(engine, "u")
        u.close()
        u.close()
        assert engine.aborted == ["u"]  # an unfinished stream aborts once

    asyncio.run(run())
