"""The prediction service: ``sentilens serve`` (FastAPI app, micro-batching worker, limits, web page)."""
