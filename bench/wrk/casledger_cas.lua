-- Compare-and-swap writes through the casledger HTTP bridge.
--
--   wrk -t N -c N -s casledger_cas.lua URL -- own|shared [value-bytes]
--
-- own:    each thread writes bench/k<thread id>, a key of its own: every CAS should succeed.
-- shared: every thread writes bench/contended: on a 412 the script takes the current ETag from
--         the 412 response's ETag header and tries again (contended-key goodput).
--
-- The thread first GETs its key to learn the ETag (a 404: it creates it with If-None-Match: *),
-- then PUTs with If-Match: <the ETag of the previous response>. Only 200/201/204 count as ok.

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
local report = require("report")

setup = report.setup
done = report.done

function init(args)
   report.init_counters()
   local mode = args[1] or "own"
   size = tonumber(args[2] or "64")
   path = mode == "shared" and "/v1/bench/contended" or string.format("/v1/bench/k%d", id)
   etag = nil       -- the ETag of the version this thread last saw
   create = false   -- the key is absent: create it
   n = 0
end

function request()
   if etag == nil and not create then
      return wrk.format("GET", path, {}, nil)
   end
   n = n + 1
   local headers = { ["Content-Type"] = "application/json" }
   if create then
      headers["If-None-Match"] = "*"
   else
      headers["If-Match"] = etag
   end
   return wrk.format("PUT", path, headers, report.value(id, n, size))
end

function response(status, headers, body)
   local tag = report.header(headers, "etag")
   if etag == nil and not create then  -- the answer to the learning GET
      learns = learns + 1
      if status == 200 and tag then
         etag = tag
      elseif status == 404 then
         create = true
      else
         report.unexpected(status, body)
      end
      return
   end
   if status == 200 or status == 201 or status == 204 then
      ok = ok + 1
      etag, create = tag, false
      if tag == nil then report.unexpected(status, "no ETag header: " .. body) end
   elseif status == 412 then
      conflicts = conflicts + 1
      etag, create = tag, false  -- the 412 carries the current ETag; none: read again
   else
      report.unexpected(status, body)
      etag, create = nil, false  -- start over with a read
   end
end
