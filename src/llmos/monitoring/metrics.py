"""Every metric of LLM OS: names, labels, units and buckets in one place.

Names follow vLLM's (``vllm:`` becomes ``llmos_``) and its bucket choices, so its dashboards and
alert rules translate directly. Label values are bounded: on request series ``model_name`` is the
registered name a request resolved to (a model or an adapter, never the alias the client wrote),
or ``name@N`` when the request named that version, as every request an alias routes does (so a
canary's versions have series of their own), capped by ``MODEL_NAMES``; on gauges it is a resident
model, its series removed on eviction (adapters get a label only while resident, in
``llmos_lora_adapter_resident``); ``tenant`` is an
administered tenant; ``code`` and ``finished_reason`` come from fixed sets in the source; never a
request id.

Everything lives in prometheus_client's default ``REGISTRY`` with its process collector, so
``/metrics`` and the alert evaluator read the same numbers.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics

# The ``_created`` series double every counter and histogram; nothing here reads them.
disable_created_metrics()

PREFIX = "llmos_"
UNKNOWN_MODEL = "unknown"
"""``model_name`` of a request whose model was never resolved (a name that does not exist)."""
OTHER_MODEL = "other"
"""``model_name`` of any model past the first ``MODEL_NAMES.limit`` seen by this process."""

# vLLM's buckets (vllm/v1/metrics/loggers.py), so its dashboards read these unchanged.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
TOKEN_COUNT_BUCKETS = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5))
"""vLLM's 1-2-5 series (up to its model's context; here up to 500,000 tokens)."""
HTTP_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip


class LabelCap:
    """Keeps a label's values bounded: the first ``limit`` distinct values pass, later ones
    become ``overflow`` (a metric's series live as long as the process)."""

    def __init__(self, limit: int, overflow: str) -> None:
        self.limit = limit
        self.overflow = overflow
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) < self.limit:
                self._seen.add(value)
                return value
        return self.overflow


MODEL_NAMES = LabelCap(64, OTHER_MODEL)

# -- serving: gauges sampled from the engine's stats (monitoring/sampler.py) -------------------
NUM_REQUESTS_RUNNING = Gauge(
    "llmos_num_requests_running", "Requests in the model's batch (prefilling or decoding).", ["model_name"]
)
NUM_REQUESTS_WAITING = Gauge("llmos_num_requests_waiting", "Requests queued for the model's batch.", ["model_name"])
BATCH_CURRENT_SIZE = Gauge(
    "llmos_batch_current_size", "Rows (choices) decoded by the model's latest step.", ["model_name"]
)
KV_CACHE_USAGE = Gauge(
    "llmos_kv_cache_usage_perc",
    "Share of the model's key/value cache budget reserved by the rows it holds (0 to 1).",
    ["model_name"],
)
LORA_ADAPTERS_LOADED = Gauge(
    "llmos_lora_adapters_loaded", "Adapters resident beside the model (LoRA, prefix and prompt tuning).", ["model_name"]
)
LORA_ADAPTER_RESIDENT = Gauge(
    "llmos_lora_adapter_resident", "1 for each adapter resident now (gone when evicted).", ["model_name", "adapter"]
)
MODEL_MEMORY = Gauge(
    "llmos_model_memory_bytes", "Memory the resident model is charged against the memory budget.", ["model_name"]
)
MEMORY_BUDGET = Gauge("llmos_model_memory_budget_bytes", "The byte budget resident models share.")
ENGINE_RESTARTS = Gauge("llmos_engine_restarts", "Engine loops that crashed and were restarted since start-up.")

# -- Ray cluster mode only: each engine replica's own numbers, sampled from its reports ----------
# A family of their own rather than a label on the gauges above, so single-process series keep
# their labels (docs/scaling.md says why); ``replica`` is Ray Serve's tag name, bounded by the
# live replicas (a replica's series go with it), ``node`` its node's address.
REPLICA_LABELS = ["model_name", "replica", "node"]
REPLICA_REQUESTS_RUNNING = Gauge(
    "llmos_replica_num_requests_running", "Requests in the batch of one engine replica.", REPLICA_LABELS
)
REPLICA_REQUESTS_WAITING = Gauge(
    "llmos_replica_num_requests_waiting", "Requests queued for the batch of one engine replica.", REPLICA_LABELS
)
REPLICA_SERVER_IN_FLIGHT = Gauge(
    "llmos_replica_server_requests_in_flight",
    "Requests this API server has in flight on one ready engine replica (the others' are on theirs).",
    REPLICA_LABELS,
)
REPLICA_GENERATION_TOKENS = Counter(
    "llmos_replica_generation_tokens",
    "Tokens one engine replica generated (also for requests later aborted).",
    REPLICA_LABELS,
)

# -- serving: counted as requests end (the one generation path, api/openai/common.py) ---------
PROMPT_TOKENS = Counter("llmos_prompt_tokens", "Prompt tokens of finished requests.", ["model_name", "tenant"])
GENERATION_TOKENS = Counter(
    "llmos_generation_tokens", "Tokens generated for requests (also of those aborted).", ["model_name", "tenant"]
)
REQUEST_SUCCESS = Counter(
    "llmos_request_success",
    "Choices that finished, by reason (stop, length, abort when the client left).",
    ["model_name", "finished_reason"],
)
REQUEST_ERRORS = Counter("llmos_request_errors", "API requests answered with an error, by error code.", ["code"])
PREFIX_CACHE_QUERIES = Counter(
    "llmos_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", ["model_name"]
)
PREFIX_CACHE_HITS = Counter("llmos_prefix_cache_hits", "Prompt tokens found in the prefix cache.", ["model_name"])
SPEC_DECODE_DRAFT_TOKENS = Counter(
    "llmos_spec_decode_draft_tokens", "Draft tokens speculative decoding verified.", ["model_name"]
)
SPEC_DECODE_ACCEPTED_TOKENS = Counter(
    "llmos_spec_decode_accepted_tokens", "Draft tokens speculative decoding accepted into the output.", ["model_name"]
)
QUOTA_REJECTIONS = Counter(
    "llmos_quota_rejections", "Requests refused by a tenant's limits or quotas.", ["tenant", "reason"]
)

TIME_TO_FIRST_TOKEN = Histogram(
    "llmos_time_to_first_token_seconds",
    "From the request reaching the engine to its first token.",
    ["model_name"],
    buckets=TTFT_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "llmos_inter_token_latency_seconds",
    "Between successive tokens of one choice.",
    ["model_name"],
    buckets=INTER_TOKEN_BUCKETS,
)
E2E_REQUEST_LATENCY = Histogram(
    "llmos_e2e_request_latency_seconds",
    "From the request reaching the engine to its last token.",
    ["model_name"],
    buckets=REQUEST_LATENCY_BUCKETS,
)
REQUEST_QUEUE_TIME = Histogram(
    "llmos_request_queue_time_seconds",
    "Time a request waited in its model's queue before admission to the batch.",
    ["model_name"],
    buckets=REQUEST_LATENCY_BUCKETS,
)
REQUEST_PROMPT_TOKENS = Histogram(
    "llmos_request_prompt_tokens", "Prompt tokens per request.", ["model_name"], buckets=TOKEN_COUNT_BUCKETS
)
REQUEST_GENERATION_TOKENS = Histogram(
    "llmos_request_generation_tokens",
    "Tokens generated per request (all its choices).",
    ["model_name"],
    buckets=TOKEN_COUNT_BUCKETS,
)

# -- HTTP (monitoring/http.py): the route template, never the raw path ------------------------
HTTP_REQUESTS = Counter("llmos_http_requests", "HTTP requests answered.", ["method", "route", "status"])
HTTP_REQUEST_DURATION = Histogram(
    "llmos_http_request_duration_seconds",
    "From the request's arrival to the end of its response body.",
    ["method", "route"],
    buckets=HTTP_DURATION_BUCKETS,
)

# -- training (sampled from the job store: a worker process writes its metrics there) ---------
FINE_TUNING_JOBS = Gauge("llmos_fine_tuning_jobs", "Fine-tuning jobs by status.", ["status"])
TRAINING_TOKENS_PER_SECOND = Gauge(
    "llmos_training_tokens_per_second", "Training throughput of each running job (its latest report).", ["job_id"]
)
TRAINING_LOSS = Gauge("llmos_training_loss", "Latest training loss of each running job.", ["job_id"])
TRAINING_ACCURACY = Gauge(
    "llmos_training_accuracy", "Latest token or label accuracy of each running job (0 to 1).", ["job_id"]
)

# -- model outputs (api/tasks/classifications.py; read by the model-output alert rules) --------
CONFIDENCE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(1, 21))
CLASSIFICATION_LABELS = Counter(
    "llmos_classification_labels",
    "Inputs classified, by the label returned first (a model's own label set bounds it).",
    ["model_name", "label"],
)
CLASSIFICATION_CONFIDENCE = Histogram(
    "llmos_classification_confidence",
    "Score of the label returned first for each classified input (0 to 1).",
    ["model_name"],
    buckets=CONFIDENCE_BUCKETS,
)
MODERATION_BLOCKED = Counter(
    "llmos_moderation_blocked",
    "Chat completions refused by their tenant's moderation policy, by stage (input, output) and the "
    "first category flagged (OpenAI's 13 bound it).",
    ["stage", "category"],
)

__all__ = ["REGISTRY"]
