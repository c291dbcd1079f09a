-- Reads of one hot key through the casledger HTTP bridge: GET /v1/bench/hot.
--
--   wrk -t N -c N -s casledger_read.lua URL
--
-- Only a 200 counts as ok (the key is written before the run).

local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
local report = require("report")

setup = report.setup
done = report.done

function init(args)
   report.init_counters()
   req = wrk.format("GET", "/v1/bench/hot", {}, nil)
end

function request()
   return req
end

function response(status, headers, body)
   if status == 200 then
      ok = ok + 1
   else
      report.unexpected(status, body)
   end
end
