"""One settings object for the whole platform.

Every option is read, in increasing priority, from its default, the TOML config file
(``$LLMOS_HOME/config.toml`` or the file named by ``LLMOS_CONFIG``), an ``LLMOS_*``
environment variable, and finally a CLI flag (the CLI passes flags as overrides).
``docs/configuration.md`` lists every field; a test keeps that list complete.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError


def _default_home() -> Path:
    return Path(os.environ.get("LLMOS_HOME", Path.home() / ".llmos")).expanduser()


def _config_file() -> Path:
    explicit = os.environ.get("LLMOS_CONFIG")
    return Path(explicit).expanduser() if explicit else _default_home() / "config.toml"


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA ranks vLLM's kernels are built for (its ``max_lora_rank`` must be one)."""


class Settings(BaseSettings):
    """Platform settings. Environment variables are the field names upper-cased with ``LLMOS_``."""

    # Inputs stay out of error messages: a rejected value may be a secret (a key, a webhook's token).
    model_config = SettingsConfigDict(env_prefix="LLMOS_", extra="ignore", hide_input_in_errors=True)

    home: Path = Field(default_factory=_default_home, description="Data directory (database, artifact store, caches).")
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL of the metadata database; default SQLite at $LLMOS_HOME/llmos.db. "
        "PostgreSQL works too (postgresql+psycopg://...).",
    )
    artifact_store: str = Field(
        default="",
        description="Where models, adapters and files are stored: empty for $LLMOS_HOME/store, or an "
        "S3-compatible bucket `s3://bucket/prefix` (needs `llmos[s3]`; credentials from boto3's usual chain).",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="Endpoint of an S3-compatible service (MinIO, Ceph, moto); default AWS's."
    )
    s3_cache_mb: int = Field(
        default=10240,
        ge=16,
        description="Local copies of blobs read from `artifact_store`, least recently used evicted.",
    )
    limits_store: Literal["memory", "database"] = Field(
        default="memory",
        description="Where rate, token and concurrency limits are counted: this process's memory, or the "
        "database (shared by every API server on it, and kept across restarts).",
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster mode (docs/scaling.md, `pip install llmos[ray]`): None serves in this process; "
        "`auto` starts a local Ray head on `ray_bind_host`; `HOST:PORT` joins that cluster's head. Engine replicas "
        "then run as Ray actors.",
    )
    ray_bind_host: str = Field(
        default="127.0.0.1",
        description="This server's Ray address. Loopback: Ray's single-machine mode, every Ray port on loopback "
        "(one node). Another address (only with `ray_allow_remote_bind`): a multi-node cluster, whose gRPC ports "
        "Ray opens on every interface, guarded by its token.",
    )
    ray_allow_remote_bind: bool = Field(
        default=False,
        description="Allow `ray_bind_host` to be a non-loopback address (Ray's ports reachable from the network; "
        "keep token authentication and a firewall in front).",
    )
    ray_dashboard_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Ray dashboard an `auto` head serves on `ray_bind_host` (needs `ray[default]`); "
        "0 leaves it off.",
    )
    ray_auth_token_file: Path | None = Field(
        default=None,
        description="File holding the Ray cluster's authentication token (Ray's token authentication is always "
        "on); default $LLMOS_HOME/ray_auth_token, created owner-only by an `auto` head.",
    )
    ray_min_replicas: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Engine replicas each model gets in Ray cluster mode, placed on nodes by the platform.",
    )
    ray_max_replicas: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Most engine replicas a model scales up to on its queue depth (None: `ray_min_replicas`, "
        "no scaling).",
    )
    ray_target_queue_depth: int = Field(
        default=8,
        ge=1,
        description="Requests in flight per replica a model is scaled for: its replicas are the requests in "
        "flight over all of them divided by this, rounded up, between the minimum and the maximum.",
    )
    ray_scale_down_delay_s: float = Field(
        default=60.0,
        ge=0,
        description="How long a model must want fewer replicas than it has before an idle one is stopped.",
    )
    ray_replica_cpus: float = Field(
        default=1.0, gt=0, le=1024, description="CPUs Ray reserves for each engine replica on its node."
    )
    ray_replica_gpus: float = Field(
        default=0.0,
        ge=0,
        le=64,
        description="GPUs Ray reserves for each engine replica of a chat or completion model in Ray cluster mode "
        "(a fraction shares one); it is placed only on a node with that many unreserved and sees only the GPUs Ray "
        "gives it. Replicas of other models, and all replicas when 0, reserve none and see no GPU: they serve on CPUs.",
    )
    ray_adapter_queue_limit: int = Field(
        default=4,
        ge=1,
        description="A request for an adapter goes to a replica already holding it unless that replica has this "
        "many requests in flight (overloaded); then to the least busy replica.",
    )
    ray_job_cpus: float = Field(
        default=1.0,
        gt=0,
        le=1024,
        description="CPUs Ray reserves for each fine-tuning job's worker on its node (its torch threads, "
        "unless `training_threads` is set).",
    )
    ray_job_gpus: float = Field(
        default=0.0,
        ge=0,
        le=64,
        description="GPUs a fine-tuning job asks for when its method does not say (`method.<type>.gpus`), written "
        "into the job at creation. A job asking for GPUs trains on a GPU where torch sees one (else on CPUs, "
        "saying so); in Ray cluster mode it starts only on a node with that many unreserved, and trains on the "
        "GPU Ray gives it. 0: jobs train on CPUs.",
    )
    ray_job_memory_mb: int = Field(
        default=2048,
        ge=0,
        description="Memory Ray reserves for a fine-tuning job's worker that has no estimate of its own: each "
        "job's peak memory is estimated when it is created (its base model's shapes, method, batch size and "
        "sequence length) and reserved instead; this figure serves where the model's shapes cannot be read, "
        "and for jobs queued before estimates were made. A job starts only on a node with its reservation "
        "unreserved.",
    )
    host: str = Field(default="127.0.0.1", description="Address `llmos serve` binds to.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port `llmos serve` listens on.")
    allowed_hosts: list[str] = Field(
        default=[],
        description="Host header names the server answers. Empty: loopback names only when bound to loopback "
        "(DNS-rebinding protection), any name otherwise.",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        description="Bootstrap admin API key used instead of generating one at first start (automation).",
    )
    secret_file: Path | None = Field(
        default=None,
        description="File holding the server secret API keys are hashed with (HMAC-SHA256); default "
        "$LLMOS_HOME/secret, created owner-only at first start. Keep it out of database backups: with it, a copy "
        "of the database can test guesses of keys.",
    )
    http_header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A connection that has not sent a complete request head (line and headers) within this many "
        "seconds of opening, or of its previous response, is closed.",
    )
    http_body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A request whose body stops arriving for this many seconds is answered 408 request_timeout.",
    )
    http_keep_alive_s: int = Field(
        default=5, ge=1, description="An idle keep-alive connection is closed after this many seconds."
    )
    http_max_connections: int = Field(
        default=512,
        ge=1,
        description="Most open connections: one beyond it is answered 503 overloaded as it opens and closed; keep "
        "it under the process's open-file limit (`ulimit -n`).",
    )
    http_max_header_bytes: int = Field(
        default=16384,
        ge=1024,
        description="Largest request head (request line and headers); a larger one gets 400 and the connection closed.",
    )
    console_enabled: bool = Field(
        default=True, description="Serve the web console at /ui (sign-in with an API key; docs/console.md)."
    )
    console_session_ttl_s: int = Field(
        default=8 * 3600, ge=60, le=30 * 86400, description="A console session ends this long after sign-in."
    )
    docs_enabled: bool = Field(
        default=False,
        description="Serve the interactive API docs at /docs and /redoc. They load their scripts from a public CDN, "
        "so they are off by default; /openapi.json is always served.",
    )
    default_models: list[str] = Field(
        default=["smollm2-135m-instruct", "all-minilm-l6-v2"],
        description="Catalog models `llmos serve --pull` fetches before starting.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="Inference weight dtype; auto picks bfloat16 on CPUs with AVX-512 BF16/AMX, else float32.",
    )
    decode_weights: Literal["bf16", "int8"] = Field(
        default="bf16",
        description="Weights decode steps of up to 4 rows read, for bfloat16 chat models: bf16 (the model's own) "
        "or int8 copies quantised per output row (about 2x faster single-stream decoding, +50% weight memory, "
        "outputs differ slightly from the bf16 model's). Larger batches and prefill always use bf16.",
    )
    native_kernels: bool = Field(
        default=True,
        description="Build the engine's small C kernels with the system's C compiler on first use (cached under "
        "`kernel_dir`): decode steps mixing LoRA adapters add each row's "
        "own adapter in one call a layer group. Without a compiler, or false, the PyTorch path is used.",
    )
    kernel_dir: str = Field(
        default="",
        description="Directory the engine's C kernels are built into and cached in (empty: "
        "`~/.cache/llmos/kernels`); used only if this user alone may write there, else a private temporary "
        "directory.",
    )
    gguf_backend: Literal["torch", "llama.cpp"] = Field(
        default="torch",
        description="Backend of chat models pulled from a GGUF file: torch (the bf16 conversion, the fastest with "
        "many clients) or llama.cpp (the original quantised file through llama-cpp-python, `pip install "
        "llmos[gguf]`; about 3x faster for one client, slower with many; adapters of such a model run on a torch "
        "runner loaded beside it). Other models always use torch.",
    )
    gpu_backend: Literal["auto", "vllm", "torch"] = Field(
        default="auto",
        description="Backend of chat and completion models when an NVIDIA GPU is present: auto serves a model with "
        "vLLM (`pip install llmos[vllm]`) where vllm imports, a GPU has the free memory vLLM is given "
        "(vllm_gpu_memory_utilization) and vLLM knows the model's architecture, else with torch on the CPU; vllm "
        "forces vLLM (start-up fails without a GPU or the extra; a model vLLM cannot serve fails to load); torch "
        "never uses vLLM.",
    )
    vllm_gpu_memory_utilization: float = Field(
        default=0.85,
        gt=0.0,
        le=0.98,
        description="Fraction of a GPU's memory each model vLLM serves takes (its weights and key/value cache); "
        "a GPU with less than this fraction free is passed over.",
    )
    vllm_max_lora_rank: int = Field(
        default=64,
        description="Largest LoRA rank vLLM can apply to a model it serves (one of the ranks vLLM compiles for; "
        "sized at load; a request for an adapter of a larger rank fails).",
    )
    llamacpp_cache_tokens: int = Field(
        default=16384,
        ge=256,
        description="Key/value cache cells of each model served by llama.cpp, allocated when it loads and shared "
        "by its running requests and cached prefixes; a request is admitted while every running one could still "
        "grow to its prompt plus max_tokens, else it waits (one that could never fit gets 400 kv_cache_exceeded).",
    )
    threads: int = Field(default=0, ge=0, description="Torch intra-op threads for inference; 0 leaves torch's default.")
    memory_budget_mb: int = Field(
        default=8192,
        ge=1,
        description="Resident model memory budget; the least recently used idle model is evicted beyond it.",
    )
    max_batch_size: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="Most sequences the llama.cpp backend decodes together (its sequence slots, allocated at load); "
        "the torch backend admits rows by `kv_cache_mb` and `step_token_budget` instead.",
    )
    batch_wait_ms: float = Field(
        default=5.0, ge=0, le=1000, description="How long the engine waits for more requests before starting a batch."
    )
    adapter_memory_mb: int = Field(
        default=512,
        ge=1,
        description="Memory for LoRA adapters beside each resident base model; idle adapters are evicted "
        "least recently used beyond it.",
    )
    prefix_cache_mb: int = Field(
        default=256,
        ge=0,
        description="Memory for the key/value states of prompt prefixes (system prompts) per chat model, "
        "reused by later prompts of the same tenant that start the same way; 0 turns prefix caching off.",
    )
    kv_cache_mb: int = Field(
        default=4096,
        ge=1,
        description="Key/value cache memory of each chat model's decode batch on the torch backend. A request is "
        "admitted while the rows held and its prompt fit within it with room to grow, else it waits; when the rows "
        "outgrow it, the youngest request gives its cache back and is prefilled again later (preempted, never "
        "failed); one that could never fit alone is refused (400 kv_cache_exceeded). A model whose budget cannot "
        "hold one prefill chunk fails to load, naming this setting.",
    )
    heap_slack_mb: int = Field(
        default=32,
        ge=0,
        description="Freed memory the server may keep resident while its engines work: past it, an engine gives "
        "the C heap's free memory back to the system after its step (malloc_trim), so a burst's resident memory "
        "stays within what its batches use plus this; 0 gives it back only when an engine goes idle.",
    )
    tenant_rows_when_shared: int = Field(
        default=4,
        ge=0,
        le=1024,
        description="While a tenant with at most this many requests is active (or was in the last 2 s), no "
        "tenant decodes more than this many rows of a chat model's batch; the rest wait or are parked, so one "
        "tenant's flood barely slows another's tokens. Busy tenants alone share the whole batch equally; 0 turns "
        "this off.",
    )
    prefill_chunk_tokens: int = Field(
        default=512,
        ge=1,
        description="Most prompt tokens prefilled between two decode steps (one packed pass); bounds the pause "
        "running streams see when new requests arrive. Less than `step_token_budget`.",
    )
    scoring_step_tokens: int = Field(
        default=8,
        ge=1,
        description="Most prompt tokens an engine step of a chat model gives scoring requests (prompt logprobs "
        "with at most one token generated: lm-evaluation-harness, rerank by a causal model) while requests that "
        "generate are prefilling or decoding, or were in the last 2 s; otherwise they get a whole chunk. Smaller "
        "keeps interactive first tokens closer to an idle server's, larger scores faster beside them.",
    )
    scoring_pause_ratio: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="While requests that generate were prefilling or decoding in the last 2 s, a chat model's "
        "engine on the torch backend stays idle before each step that would only score prompts, for this many "
        "times the last step's time or until a generating request arrives (taken at once), so that an arrival "
        "finds it idle rather than mid-step: ratio / (1 + ratio) of the time, and a client's next request, sent "
        "as its answer ends, finds it idle. Scoring beside them goes at 1 / (1 + ratio) "
        "of its speed; scoring with nothing generating never pauses, nor do steps that decode or prefill "
        "anything else (a batch's lines). 1 is the default, measured in docs/performance.md; 0 turns this off.",
    )
    step_token_budget: int = Field(
        default=640,
        ge=2,
        le=65536,
        description="Tokens one engine step of a chat model computes on the torch backend: one for each row it "
        "decodes, then chunks of waiting prompts with what is left (at most `prefill_chunk_tokens`); so at most one "
        "fewer rows are decoded at once (a step always keeps a token for the prompts). Must exceed "
        "`prefill_chunk_tokens`, so that a step holds a whole chunk and a decoding row.",
    )
    speculative_decoding: Literal["auto", "off", "ngram"] = Field(
        default="auto",
        description="Speculative decoding of a single stream (one decoding row, no prompt waiting) of a chat model "
        "on the torch backend: its next tokens are drafted from the latest earlier occurrence of its last "
        "tokens in its prompt and output (prompt lookup) and verified in one pass. auto (the default): a row "
        "drafts while its acceptance makes a verify pay for its cost (docs/adr/0027); ngram: whenever a draft "
        "is found; off: never. Greedy output is unchanged (bit for bit on Llama-family models where the CPU's "
        "bf16 products round a row alike alone and in the verify, as measured for SmolLM2 without adapters; up "
        "to rounding otherwise in bf16), sampled output keeps its distribution.",
    )
    speculative_tokens: int = Field(
        default=8, ge=1, le=32, description="Most draft tokens one verify pass of speculative decoding checks."
    )
    draft_models: dict[str, str] = Field(
        default_factory=dict,
        description="Draft models for speculative decoding: a chat model's name -> a smaller model of its family "
        "with the same tokenizer (e.g. qwen2.5-coder-1.5b-instruct -> qwen2.5-coder-0.5b-instruct), loaded beside "
        "it. Where prompt lookup finds no draft, the small model proposes the next tokens one greedy step at a "
        "time, and the target verifies them in one pass (docs/adr/0027). Checked at start-up for the models "
        "registered then, at load for the others.",
    )
    max_n: int = Field(default=8, ge=1, le=128, description="Largest `n` (choices per request) accepted.")
    max_tokens_cap: int = Field(default=4096, ge=1, description="Largest `max_tokens` accepted, whatever the context.")
    max_top_logprobs: int = Field(default=20, ge=0, le=20, description="Largest `top_logprobs` accepted.")
    max_stop_sequences: int = Field(default=4, ge=0, le=64, description="Most stop sequences per request.")
    grammar_compile_budget: int = Field(
        default=1_000_000,
        ge=1000,
        description="Work a structured output's grammar (JSON Schema, regex, choice, forced tool call) may take to "
        "compile, in llguidance's lexer fuel (about 50,000 a millisecond); one over it is refused with 400.",
    )
    grammar_cache_entries: int = Field(
        default=256, ge=1, description="Compiled structured-output grammars kept per model tokenizer."
    )
    max_embedding_inputs: int = Field(default=2048, ge=1, description="Most inputs in one embeddings request.")
    vector_store_embedding_model: str = Field(
        default="all-minilm-l6-v2",
        min_length=1,
        description="Embedding model of a vector store created without `embedding_model`.",
    )
    vector_store_rerank_model: str | None = Field(
        default=None,
        min_length=1,
        description="Model that reranks vector store searches whose `ranking_options.ranker` is not `none` "
        "and that name no `rerank_model` of their own; none: searches rank by similarity alone.",
    )
    moderation_model: str | None = Field(
        default=None,
        min_length=1,
        description="Classification model of `/v1/moderations` when neither the request nor the tenant's policy "
        "names one.",
    )
    moderation_threshold: float = Field(
        default=0.5, gt=0.0, le=1.0, description="Category score at which moderation flags it, unless a policy says."
    )
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, description="Largest request body; larger gets 413.")
    max_upload_bytes: int = Field(
        default=512 * 1024 * 1024, ge=1024, description="Largest file accepted by POST /v1/files; larger gets 413."
    )
    storage_quota_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Bytes of files and models each tenant may keep (each file or model counted whole, even "
        "when its content is shared); an upload beyond it gets 403 storage_quota_exceeded. A tenant's own "
        "`storage_bytes` limit replaces it. None: unlimited.",
    )
    maintenance_interval_s: float = Field(
        default=600.0,
        ge=0,
        description="How often the server collects unreferenced blobs, writes the aggregated denied-request "
        "audit rows and deletes audit and usage rows past their retention; 0 turns the periodic run off.",
    )
    metrics_enabled: bool = Field(
        default=True,
        description="Record the Prometheus metrics served at GET /metrics (request latencies, token counts, "
        "HTTP requests, engine and training gauges); false records nothing and /metrics answers 404.",
    )
    metrics_public: bool = Field(
        default=False,
        description="Serve GET /metrics without an API key (for a Prometheus server on a trusted network); "
        "otherwise it needs a key with the `metrics` (or `admin`) scope.",
    )
    metrics_sample_interval_s: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description="How often the engine and training gauges are sampled (also right before each scrape) and a "
        "point is added to the last hour's series at /v1/admin/metrics/history.",
    )
    blob_grace_s: float = Field(
        default=86400.0,
        ge=0,
        description="The periodic collection removes an unreferenced blob (and a temporary file of an abandoned "
        "write) only once it was last written or claimed longer ago than this; it must exceed the longest "
        "model pull, which stores its files before it refers to them.",
    )
    audit_retention_days: int = Field(
        default=365, ge=0, description="Audit rows older than this many days are deleted; 0 keeps them forever."
    )
    usage_retention_days: int = Field(
        default=400, ge=0, description="Usage rows older than this many days are deleted; 0 keeps them forever."
    )
    completion_retention_days: int = Field(
        default=30,
        ge=0,
        description="Chat completions stored with `store: true` (and the feedback given on them) are deleted this "
        "many days after they were stored; 0 keeps them until their tenant deletes them.",
    )
    promotion_margin: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="How much higher a candidate's mean eval score (0 to 1) must be than the alias's current "
        "model's for `POST /v1/model_aliases/{ref}/promote` to move the alias (the difference's 95% paired "
        "bootstrap interval must also lie above zero).",
    )
    promotion_gated_aliases: list[str] = Field(
        default=["production"],
        description="Aliases that, once set, move only by an eval-gated promotion (`.../promote`); setting one "
        "with `POST /v1/model_aliases` is refused with 400 naming `eval`. Canaries and rollbacks stay allowed.",
    )
    denied_requests_per_minute: int = Field(
        default=30,
        ge=1,
        description="Denied requests (missing, wrong, revoked or expired key, or a missing scope) answered per "
        "client address and minute before further ones get 429 with Retry-After; none writes to the database.",
    )
    max_json_depth: int = Field(
        default=32, ge=4, le=1000, description="Deepest JSON nesting accepted in a request body."
    )
    max_pending_requests: int = Field(
        default=256,
        ge=1,
        description="Requests waiting for the engine beyond this are refused with 503 and Retry-After.",
    )
    max_concurrent_jobs: int = Field(default=1, ge=0, le=64, description="Fine-tuning jobs run at once (0: none).")
    batch_concurrency: int = Field(
        default=8,
        ge=0,
        le=1024,
        description="Lines of batches (/v1/batches) this server sends to the engine at once, at background "
        "priority (0: this server runs no batches).",
    )
    eval_concurrency: int = Field(
        default=4,
        ge=0,
        le=1024,
        description="Items of eval runs (/v1/evals) this server answers and grades at once, their requests at "
        "background priority (0: this server runs no eval runs).",
    )
    eval_embedding_model: str = Field(
        default="all-minilm-l6-v2",
        min_length=1,
        description="Embedding model of the `cosine` text-similarity grader of evals.",
    )
    training_threads: int = Field(default=0, ge=0, description="CPU threads per training worker; 0 uses all cores.")
    pretrain_memory_mb: int = Field(
        default=4096,
        ge=16,
        description="Memory a pre-training job may use (weights, gradients, optimizer state, activations, the "
        "tokenised corpus, as estimated from its shapes); a larger job is refused with 400 exceeds_memory_budget.",
    )
    job_max_attempts: int = Field(
        default=3, ge=1, le=20, description="Times a job's worker may die before the job is failed."
    )
    alert_evaluation_interval_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="How often the alert rules are evaluated (and the metrics they read sampled), on a background "
        "thread; 0 evaluates nothing in the background.",
    )
    alert_max_window_s: float = Field(
        default=21600.0,
        gt=0,
        le=7 * 86400,
        description="Longest span a rule may look back (its window plus a reference window): the metric samples "
        "are kept in memory that long.",
    )
    alert_rules_file: Path | None = Field(
        default=None, description="A YAML file of alert rules (see docs/alerts.md), loaded at start-up."
    )
    alert_default_rules: bool = Field(
        default=True,
        description="Load the shipped alert rules (error rate, p99 time to first token, queue depth, KV cache, "
        "failed jobs, engine restarts).",
    )
    alert_webhook_urls: list[SecretStr] = Field(
        default_factory=list,
        description="Webhooks (http or https) sent Alertmanager's version 4 payload when an alert fires or "
        "resolves; secret, as their URLs often carry a token.",
    )
    alert_webhook_timeout_s: float = Field(default=5.0, gt=0, le=120, description="Timeout of one webhook delivery.")
    alert_notify_attempts: int = Field(
        default=5, ge=1, le=20, description="Tries of each notification per receiver before it is given up."
    )
    alert_notify_backoff_s: float = Field(
        default=1.0, ge=0, le=600, description="Wait before the first retry of a notification; doubled after each."
    )
    alert_external_url: str | None = Field(
        default=None,
        max_length=2048,
        description="The server's URL as receivers should link to it (`externalURL`, `generatorURL`); by default "
        "http://host:port.",
    )
    alert_smtp_host: str | None = Field(default=None, description="SMTP server that e-mails alerts; None: no e-mail.")
    alert_smtp_port: int = Field(default=587, ge=1, le=65535, description="Port of the SMTP server.")
    alert_smtp_username: str | None = Field(default=None, description="SMTP login user, if the server wants one.")
    alert_smtp_password: SecretStr | None = Field(default=None, description="SMTP login password.")
    alert_smtp_starttls: bool = Field(default=True, description="Upgrade the SMTP connection with STARTTLS.")
    alert_email_from: str | None = Field(default=None, description="Sender of alert e-mails (default llmos@host).")
    alert_email_to: list[str] = Field(default_factory=list, description="Recipients of alert e-mails.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Server log level.")

    @model_validator(mode="after")
    def _step_holds_a_chunk(self) -> Settings:
        if self.step_token_budget <= self.prefill_chunk_tokens:
            raise ValueError(
                f"step_token_budget ({self.step_token_budget}) must exceed prefill_chunk_tokens "
                f"({self.prefill_chunk_tokens}): a step holds one prompt chunk and at least one decoding row"
            )
        return self

    @model_validator(mode="after")
    def _ray_binds_loopback(self) -> Settings:
        # Ray's ports run code for whoever reaches them (ShadowRay, CVE-2023-48022): never the network by default.
        if not self.ray_allow_remote_bind and not is_loopback(self.ray_bind_host):
            raise ValueError(
                f"ray_bind_host {self.ray_bind_host!r} is not a loopback address; set ray_allow_remote_bind = true "
                "to expose Ray's ports beyond this machine"
            )
        if self.ray_max_replicas is not None and self.ray_max_replicas < self.ray_min_replicas:
            raise ValueError(
                f"ray_max_replicas ({self.ray_max_replicas}) is below ray_min_replicas ({self.ray_min_replicas})"
            )
        return self

    @model_validator(mode="after")
    def _speculation_has_a_backend(self) -> Settings:
        if self.speculative_decoding == "ngram" and self.gguf_backend == "llama.cpp":
            raise ValueError(
                "speculative_decoding 'ngram' needs the torch backend: gguf_backend 'llama.cpp' does not speculate "
                "(use 'auto', which speculates where the backend can)"
            )
        if self.draft_models and self.speculative_decoding == "off":
            raise ValueError("draft_models needs speculative_decoding 'auto' or 'ngram', not 'off'")
        for target, draft in self.draft_models.items():
            if not target or not draft or target == draft:
                raise ValueError(f"draft_models: {target!r} -> {draft!r} must name two different models")
        return self

    @field_validator("vllm_max_lora_rank", mode="after")
    @classmethod
    def _a_rank_vllm_compiles_for(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"vllm_max_lora_rank must be one of {', '.join(map(str, VLLM_LORA_RANKS))}")
        return value

    @field_validator("home", mode="after")
    @classmethod
    def _expand_home(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("alert_webhook_urls", mode="after")
    @classmethod
    def _webhook_urls(cls, value: list[SecretStr]) -> list[SecretStr]:
        for i, url in enumerate(value):
            parts = urlsplit(url.get_secret_value())
            if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in parts.geturl()):
                # The URL itself stays out of the message: it may hold a token.
                raise ValueError(f"alert_webhook_urls[{i}] is not an http or https URL with a host")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, _config_file()))

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'llmos.db'}"

    @property
    def store_dir(self) -> Path:
        return self.home / "store"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def ray_token_path(self) -> Path:
        return (self.ray_auth_token_file or self.home / "ray_auth_token").expanduser()

    @property
    def secret_path(self) -> Path:
        return (self.secret_file or self.home / "secret").expanduser()

    def as_public_dict(self) -> dict[str, Any]:
        """Settings as shown to operators: every ``SecretStr`` field (the convention for secrets) and
        the database URL's password masked."""
        data = self.model_dump(mode="json")
        for name in type(self).model_fields:
            if isinstance(getattr(self, name), SecretStr):
                data[name] = "***"
        if self.database_url:
            try:
                data["database_url"] = make_url(self.database_url).render_as_string(hide_password=True)
            except ArgumentError:  # not a URL SQLAlchemy reads: shown not at all rather than unmasked
                data["database_url"] = "***"
        return data


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
