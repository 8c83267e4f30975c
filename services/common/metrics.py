"""Prometheus metrics shared by the services (each service exposes /metrics on its own port).

/metrics is not authenticated: no series carries a tenant label, and job-labelled ones are opt-in.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

RPC_LATENCY = Histogram("samforge_rpc_latency_seconds", "RPC latency by method", ["method"], buckets=LATENCY_BUCKETS)
RPC_ERRORS = Counter("samforge_rpc_errors_total", "RPCs that ended with an error status", ["method", "code"])
CACHE_HITS = Counter("samforge_cache_hits_total", "embedding cache hits", ["cache"])
CACHE_MISSES = Counter("samforge_cache_misses_total", "embedding cache misses", ["cache"])
CACHE_EVICTIONS = Counter("samforge_cache_evictions_total", "embedding cache evictions", ["cache"])
CACHE_BYTES = Gauge("samforge_cache_bytes", "bytes held by an embedding cache", ["cache"])
BATCH_SIZE = Histogram("samforge_encoder_batch_size", "images per encoder call", buckets=(1, 2, 3, 4, 6, 8, 16, 32))
QUEUE_DEPTH = Gauge("samforge_encoder_queue_depth", "images waiting for the encoder")
MEMORY_BUDGET = Gauge("samforge_memory_budget_bytes", "bytes the service may hold above its idle base, from its "
                      "settings (services.common.memory)")
ENCODES = Counter("samforge_encodes_total", "images encoded (cache misses that ran the encoder)")
PROMPTS = Histogram("samforge_decoder_prompts_per_call", "prompts per Segment call",
                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
LOADED_ADAPTERS = Gauge("samforge_loaded_adapters", "adapters loaded in memory")
ADAPTER_LOAD_FAILURES = Counter("samforge_adapter_load_failures_total", "adapter artifacts rejected at load")
TRAINING_JOBS = Gauge("samforge_training_jobs", "training jobs by state", ["state"])
TRAINING_STEPS = Counter("samforge_training_steps_total", "training steps run (all jobs)")
# job-labelled: exported only with SAMFORGE_METRICS_JOB_LABELS=true (services/trainer/job_metrics.py)
TRAINING_STEP = Gauge("samforge_training_step", "current step of a running job", ["job"])
TRAINING_LOSS = Gauge("samforge_training_loss", "latest training loss of a running job", ["job"])
TRAINING_VAL_DICE = Gauge("samforge_training_val_dice", "latest validation Dice of a running job", ["job"])
