-- Shared by the bench/wrk scripts: per-thread counters, the thread ids, base64, and done(),
-- which prints one machine-readable line for bench/http_bench.py:
--
--   WRK_RESULT {"ok":..,"conflicts":..,"errors":..,"latency_us":{"p50":..,"p99":..},...}
--
-- Each wrk thread runs in a Lua state of its own and keeps its counters in globals; setup()
-- and done() run in another state, which reads them with thread:get().
--
--   ok         operations that did what the scenario measures (a successful CAS, a read of the
--              key) -- the only ones counted as throughput
--   conflicts  CAS attempts refused because the key had moved on (casledger 412, etcd txn
--              "succeeded" false): expected when threads contend, a bug when they do not
--   learns     reads a CAS script makes to learn the current version (first request only)
--   errors     any other answer (its status counted in statuses, the first body kept)

local M = {}

local threads = {}
local next_id = 0

function M.setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

function M.init_counters()
   ok, conflicts, learns, errors = 0, 0, 0, 0
   statuses = {}
   sample = nil
end

-- An answer the script did not expect: count its status and keep the first body.
function M.unexpected(status, body)
   errors = errors + 1
   local key = tostring(status)
   statuses[key] = (statuses[key] or 0) + 1
   if sample == nil then
      sample = tostring(status) .. " " .. string.sub(body or "", 1, 600)
   end
end

function M.header(headers, name)
   local v = headers[name]
   if v ~= nil then return v end
   for k, value in pairs(headers) do
      if string.lower(k) == name then return value end
   end
   return nil
end

local alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local b64 = {}
for i = 1, 64 do b64[i - 1] = string.sub(alphabet, i, i) end

function M.base64(s)
   local out = {}
   for i = 1, #s, 3 do
      local a, b, c = string.byte(s, i, i + 2)
      local n = a * 65536 + (b or 0) * 256 + (c or 0)
      local c1 = math.floor(n / 262144) % 64
      local c2 = math.floor(n / 4096) % 64
      local c3 = math.floor(n / 64) % 64
      local c4 = n % 64
      out[#out + 1] = b64[c1] .. b64[c2] .. (b and b64[c3] or "=") .. (c and b64[c4] or "=")
   end
   return table.concat(out)
end

-- The value a CAS writes: the same bytes for casledger (as the JSON body) and etcd (as the
-- value), padded to `size` bytes.
function M.value(thread_id, n, size)
   local head = string.format('{"t":%d,"n":%d,"pad":"', thread_id, n)
   local pad = math.max(size - #head - 2, 0)
   return head .. string.rep("x", pad) .. '"}'
end

local function quote(s)
   s = string.gsub(s, '[%c"\\]', function(ch)
      if ch == '"' then return '\\"' elseif ch == "\\" then return "\\\\" end
      return string.format("\\u%04x", string.byte(ch))
   end)
   return '"' .. s .. '"'
end

function M.done(summary, latency, requests)
   local total = { ok = 0, conflicts = 0, learns = 0, errors = 0 }
   local merged, first = {}, nil
   for _, thread in ipairs(threads) do
      for name, _ in pairs(total) do
         total[name] = total[name] + (thread:get(name) or 0)
      end
      local st = thread:get("statuses") or {}
      for status, count in pairs(st) do merged[status] = (merged[status] or 0) + count end
      first = first or thread:get("sample")
   end
   local status_parts = {}
   for status, count in pairs(merged) do
      status_parts[#status_parts + 1] = string.format('%s:%d', quote(status), count)
   end
   local e = summary.errors
   print(string.format(
      'WRK_RESULT {"threads":%d,"duration_us":%d,"requests":%d,"bytes":%d,' ..
      '"ok":%d,"conflicts":%d,"learns":%d,"errors":%d,"statuses":{%s},"sample":%s,' ..
      '"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},' ..
      '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}',
      #threads, summary.duration, summary.requests, summary.bytes,
      total.ok, total.conflicts, total.learns, total.errors, table.concat(status_parts, ","),
      first and quote(first) or "null",
      e.connect, e.read, e.write, e.timeout, e.status,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      latency.mean))
end

return M
