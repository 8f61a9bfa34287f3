"""HTTP serving: the OpenAI-compatible server (the clients that measure it live in clients/).

    config.py        ServeConfig, the command line, MindIE-Service config.json mapping
    protocol.py      request parsing / validation (OpenAI chat + completions, vLLM/MindIE /generate), errors
    responses.py     response, stream-chunk and error models: every body the server sends is built from them
    prompting.py     media resolution (data URIs, --allowed_media_dir paths) and chat-template prompts
    media_fetch.py   http(s) media URLs fetched on the event loop: allowed hosts, address guard, limits
    async_engine.py  the engine thread, per-request streams, the waiting-queue limit
    api_server.py    the FastAPI app and uvicorn runner (tensor parallel under torchrun)
    metrics.py       Prometheus metrics
"""
