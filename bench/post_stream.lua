-- wrk script: POST a small chat completion with "stream": true and print one
-- machine-readable RESULT line at the end (parsed by bench/overhead.py).
-- No response() callback: defining one makes wrk hand every response to Lua,
-- which costs throughput; non-2xx/3xx answers are counted by wrk in errors.status.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
-- The key: TOOTI_BENCH_KEY (bench/overhead.py sets it per target), else the
-- constant the open gateway, the upstream and LiteLLM accept.
local key = os.getenv("TOOTI_BENCH_KEY")
if key == nil or key == "" then key = "sk-bench-1234" end
wrk.headers["Authorization"] = "Bearer " .. key
wrk.body = '{"model":"fake-model","messages":[{"role":"user","content":"Say hello in one short sentence."}],"max_tokens":32,"stream":true}'

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT rps=%.2f p50_ms=%.4f p90_ms=%.4f p99_ms=%.4f mean_ms=%.4f max_ms=%.4f"
      .. " requests=%d errors_status=%d errors_socket=%d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency.mean / 1000, latency.max / 1000,
    summary.requests, e.status, e.connect + e.read + e.write + e.timeout))
end
