"""ONNX Runtime only: the session factory, the backend the API batches into, the prior sampler and
the export parity check. Imports ``service.bundle`` and nothing else of the project."""
