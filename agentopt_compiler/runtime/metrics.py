"""/metrics: the server's state in the Prometheus text format (prometheus_client renders it).

Read at scrape time from the scheduler and the slot pool (ChatService.metrics), so nothing is counted twice and the
scheduler's thread does no extra work per token.
"""

from __future__ import annotations

# name -> (kind, help, key in ChatService.metrics())
METRICS = {
    "agentopt_queue_depth": ("gauge", "Requests waiting for a KV slot.", "queue_depth"),
    "agentopt_active_requests": ("gauge", "Requests admitted: prefilling or decoding.", "active_requests"),
    "agentopt_slots": ("gauge", "KV slots (cache rows) of the engine.", "slots"),
    "agentopt_busy_slots": ("gauge", "KV slots whose conversation is generating.", "busy_slots"),
    "agentopt_generated_tokens_per_second": ("gauge", "Tokens generated per second, all requests, over the last "
                                             "10 seconds.", "tokens_per_second"),
    "agentopt_prefix_cache_bytes": ("gauge", "Bytes of KV held by the prefix cache.", "prefix_cache_bytes"),
    "agentopt_evicted_session_bytes": ("gauge", "Bytes of KV of idle sessions evicted to host memory.",
                                       "evicted_host_bytes"),
    "agentopt_requests": ("counter", "Requests accepted.", "requests"),
    "agentopt_rejected_requests": ("counter", "Requests refused with 429 (queue full).", "rejected"),
    "agentopt_generated_tokens": ("counter", "Tokens generated.", "generated_tokens"),
    "agentopt_prefilled_tokens": ("counter", "Prompt tokens computed.", "prefilled_tokens"),
    "agentopt_cached_prompt_tokens": ("counter", "Prompt tokens served from cache (earlier turns or the prefix "
                                      "cache): prefix-cache hit tokens.", "reused_tokens"),
    "agentopt_decode_steps": ("counter", "Batched decode calls.", "decode_steps"),
    "agentopt_decode_rows": ("counter", "Sequences decoded, summed over decode calls (rows / steps = mean batch).",
                             "decode_rows"),
    "agentopt_session_evictions": ("counter", "Idle sessions whose KV was moved to host memory.", "evictions"),
    "agentopt_dropped_sessions": ("counter", "Evicted sessions whose KV was dropped under memory pressure.",
                                  "dropped_sessions"),
}


def prometheus_text(values: dict, model: str) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class Snapshot:
        def collect(self):
            for name, (kind, help_text, key) in METRICS.items():
                family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, help_text,
                                                                                         labels=["model"])
                family.add_metric([model], float(values[key]))
                yield family

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Snapshot())
    return generate_latest(registry)
