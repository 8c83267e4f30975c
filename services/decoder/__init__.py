"""Decoder service: prompts + embeddings -> masks, many prompts per call, per-request adapters.

Modules: ``engine`` (the logic, no protobuf), ``embeddings`` (local LRU of fetched embeddings, fetch /
re-embed rules, the :class:`~services.decoder.embeddings.EmbeddingSource` interface), ``encoder_client``
(that interface over gRPC to the encoder service), ``adapters`` (per-tenant resolution + LRU of adapted
decoders), ``runtime`` (ONNX Runtime or PyTorch predictors), ``masks`` (mask encodings and statistics),
``codec`` (protobuf <-> engine types), ``servicer`` (gRPC),
``__main__`` (process entry point). Importing this package is cheap: nothing is imported here.
"""
