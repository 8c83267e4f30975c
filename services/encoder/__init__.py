"""Encoder service: image embeddings by content key, cached (L1 + optional Redis L2), batched, per adapter.

Modules: ``engine`` (logic, no protobuf), ``batcher`` (dynamic batching thread), ``adapters`` (resolution +
LRU of loaded encoder adapters), ``l2`` (Redis), ``client_codec`` (EmbeddingInfo / chunk stream, used by
the decoder service), ``servicer`` (gRPC), ``__main__`` (process entry point). Importing this package is
cheap: nothing is imported here.
"""
