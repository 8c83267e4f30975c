"""Encoder service: image embeddings by content key, cached (L1 + optional Redis L2), batched, per adapter.

Modules: ``engine`` (logic, no protobuf), ``batcher`` (dynamic batching thread), ``backends`` (what runs the
image encoder), ``l2`` (Redis), ``servicer`` (gRPC), ``__main__`` (process entry point). What the decoder
shares with it lives in ``services.common`` (``adapter_models``, ``embedding_codec``, ``tiling``). Importing
this package is cheap: nothing is imported here.
"""
