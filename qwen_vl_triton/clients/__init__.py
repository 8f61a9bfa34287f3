"""Tools that talk to a running server over HTTP: they send OpenAI-style JSON and read what comes back.

    client.py     a timing chat client (TTFT, inter-token gaps, token counts) for /v1/chat/completions
    datasets.py   TextVQA, VideoBench and synthetic-image readers: the questions the tools send
    benchmark.py  the load benchmark (MindIE's `benchmark`): throughput and latency percentiles, plots
    eval.py       the accuracy evals: TextVQA (the official VQA metric), VideoBench (multiple choice)

They import nothing of the server, the engine or the model (serving/, engine/, modeling/,
kernels/, parallel/): a client needs only the server's URL. tools/benchmark.py and tools/eval.py
are their command lines; with --model_path those run the same requests through the engine in
their own process instead.
"""
