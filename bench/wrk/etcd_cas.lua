-- Compare-and-swap writes to etcd through its JSON gateway (POST /v3/kv/txn).
--
--   wrk -t N -c N -s etcd_cas.lua URL -- own|shared [value-bytes]
--
-- own:    each thread writes bench/k<thread id>; shared: every thread writes bench/contended.
-- The txn compares the key's MOD revision with the one the thread tracks and puts on success
-- (the response's header.revision is then the key's new mod_revision); its failure branch reads
-- the key, so a refused txn tells the current mod_revision (absent key: 0) and the thread
-- retries with it. The thread first reads the key once (range) to learn it.
-- Only "succeeded": true counts as ok.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
local report = require("report")

setup = report.setup
done = report.done

function init(args)
   report.init_counters()
   local mode = args[1] or "own"
   size = tonumber(args[2] or "64")
   key = report.base64(mode == "shared" and "bench/contended" or string.format("bench/k%d", id))
   mod = nil  -- the mod_revision of the version this thread last saw (0: absent)
   n = 0
end

function request()
   local headers = { ["Content-Type"] = "application/json" }
   if mod == nil then
      return wrk.format("POST", "/v3/kv/range", headers, string.format('{"key":"%s"}', key))
   end
   n = n + 1
   local body = string.format(
      '{"compare":[{"key":"%s","target":"MOD","result":"EQUAL","mod_revision":"%d"}],' ..
      '"success":[{"request_put":{"key":"%s","value":"%s"}}],' ..
      '"failure":[{"request_range":{"key":"%s"}}]}',
      key, mod, key, report.base64(report.value(id, n, size)), key)
   return wrk.format("POST", "/v3/kv/txn", headers, body)
end

function response(status, headers, body)
   if status ~= 200 then
      report.unexpected(status, body)
      mod = nil
      return
   end
   if mod == nil then  -- the answer to the learning range
      learns = learns + 1
      mod = tonumber(string.match(body, '"mod_revision":"(%d+)"') or "0")
      return
   end
   if string.find(body, '"succeeded":true', 1, true) then
      local revision = string.match(body, '"revision":"(%d+)"')
      if revision then
         ok = ok + 1
         mod = tonumber(revision)
      else
         report.unexpected(status, body)
         mod = nil
      end
   elseif string.find(body, '"response_range"', 1, true) then
      conflicts = conflicts + 1
      mod = tonumber(string.match(body, '"mod_revision":"(%d+)"') or "0")
   else
      report.unexpected(status, body)
      mod = nil
   end
end
