"""What the services share: the process (``server.serve``: health, reflection, graceful shutdown), settings,
interceptors (errors, auth, metrics), the status table, the compute thread, and the types both model services
use (``tiling``, ``embedding_codec``, ``adapter_models``), so the encoder and decoder never import each other."""
